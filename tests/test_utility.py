"""What a user's first run must say and leave: the majority baseline and one-class warnings, the progress line
inside a round, checks before Flower and Ray start, nothing left behind by a failed start, `privatune evaluate`,
`privatune resume` and `--device` errors."""

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server.app import CENTER_MAX_ERROR, center_error
from shared.cli import main
from shared.config import RunConfig
from shared.evaluation import evaluate_adapter
from shared.log import RoundProgress, configure_logging
from shared.metrics import (
    LOW_RECALL_ADVICE,
    LOW_RECALL_MIN_ROWS,
    class_recall,
    classification_metrics,
    confusion_matrix,
    divergence_warnings,
    majority_baseline,
    quality_warnings,
    rarely_found,
    recall_warning,
)
from shared.simulation import SMALL_SITE_ROWS, discard_failed_run, preflight
from tests.conftest import make_rows, write_csv
from tests.test_serving import LABELS, make_tiny_adapter


def test_majority_baseline_and_confusion_matrix():
    y = np.array([0, 0, 0, 1])
    assert majority_baseline(y, num_classes=2) == {"accuracy": 0.75, "macro_f1": pytest.approx(0.4285714), "class": 0}
    assert confusion_matrix(y, np.array([0, 1, 0, 1]), num_classes=2).tolist() == [[2, 1], [0, 1]]


def test_a_model_that_predicts_one_class_or_worse_than_the_majority_is_warned_about():
    y = np.array([0] * 60 + [1] * 40)
    baseline = majority_baseline(y, num_classes=2)
    one_class = classification_metrics(y, np.zeros_like(y), num_classes=2)
    warnings = quality_warnings(one_class, baseline, LABELS)
    assert warnings == ["predicts 'rotten' for 100% of the test rows"]  # exactly the majority: not below it
    worse = classification_metrics(y, np.array([1] * 97 + [0] * 3), num_classes=2)
    assert quality_warnings(worse, baseline, LABELS) == [
        "predicts 'fresh' for 97% of the test rows",
        "accuracy 0.3700 is below the majority baseline 0.6000",
    ]
    good = classification_metrics(y, y, num_classes=2)
    assert quality_warnings(good, baseline, LABELS) == []


def _issue_25_model() -> tuple[np.ndarray, np.ndarray]:
    """The issue's final model: it found 77 of 342 'rotten' rows, every 'fresh' row, and predicted 'fresh' for
    90.5% of the rows."""
    y_true = np.array([0] * 342 + [1] * 468)
    y_pred = np.array([0] * 77 + [1] * 265 + [1] * 468)
    return y_true, y_pred


def test_each_labels_recall_counts_its_rows_and_those_found():
    y_true, y_pred = _issue_25_model()
    assert class_recall(y_true, y_pred, label_names=LABELS) == {
        "rotten": {"rows": 342, "found": 77, "recall": pytest.approx(77 / 342)},
        "fresh": {"rows": 468, "found": 468, "recall": 1.0},
    }
    assert class_recall(np.array([1, 1]), np.array([1, 0]), label_names=LABELS)["rotten"] == {
        "rows": 0,
        "found": 0,
        "recall": 0.0,
    }


def test_a_label_found_under_half_as_often_as_the_best_is_warned_about_with_its_counts_and_what_to_try():
    y_true, y_pred = _issue_25_model()
    test = {**classification_metrics(y_true, y_pred, num_classes=2)}
    test["per_class"] = class_recall(y_true, y_pred, label_names=LABELS)
    assert test["top_class_share"] == pytest.approx(0.905, abs=5e-4)  # under the one-class warning's 95%
    warnings = quality_warnings(test, majority_baseline(y_true, num_classes=2), LABELS)
    assert warnings == [
        "finds only 77 of 342 'rotten' rows (recall 0.2251), against recall 1.0000 for 'fresh', and predicts "
        f"'fresh' for 90.5% of the test rows: {LOW_RECALL_ADVICE}"
    ]
    assert "more rounds" in LOW_RECALL_ADVICE and "max-length" in LOW_RECALL_ADVICE


def test_a_balanced_model_on_three_labels_and_a_label_with_few_rows_are_not_warned_about():
    names = ["negative", "neutral", "positive"]
    # recalls 0.8, 0.45 (a hard neutral class, over 0.5 x 0.8) and 0.7: no warning
    y_true = np.array([0] * 100 + [1] * 100 + [2] * 100)
    y_pred = np.array([0] * 80 + [1] * 20 + [1] * 45 + [0] * 30 + [2] * 25 + [2] * 70 + [1] * 30)
    per_class = class_recall(y_true, y_pred, label_names=names)
    assert [c["recall"] for c in per_class.values()] == pytest.approx([0.8, 0.45, 0.7])
    assert rarely_found(per_class) == ([], "negative")
    assert recall_warning({"per_class": per_class}, names) is None
    # the same neutral class found 35 times: under half of 0.8, warned about, the best named
    per_class["neutral"] = {"rows": 100, "found": 35, "recall": 0.35}
    assert rarely_found(per_class) == (["neutral"], "negative")
    # a label with fewer than LOW_RECALL_MIN_ROWS test rows is not judged, however low its recall
    few = {"rotten": {"rows": LOW_RECALL_MIN_ROWS - 1, "found": 1, "recall": 1 / 19}, "fresh": per_class["negative"]}
    assert rarely_found(few) == ([], None)


def test_the_classifiers_held_out_metrics_carry_each_labels_recall_and_its_warning(tiny_config):
    from shared.tasks import get_task

    task = get_task(tiny_config)
    rows = task.load_run_rows(tiny_config)
    held_out = rows.subset(range(40))
    metrics = task.evaluator(tiny_config, held_out)(task.fresh_model(tiny_config, rows))
    assert list(metrics["per_class"]) == ["rotten", "fresh"]
    assert sum(c["rows"] for c in metrics["per_class"].values()) == 40
    assert sum(c["found"] for c in metrics["per_class"].values()) == round(metrics["accuracy"] * 40)
    y_true, y_pred = _issue_25_model()
    biased = {**classification_metrics(y_true, y_pred, num_classes=2), "loss": 0.6}
    biased["per_class"] = class_recall(y_true, y_pred, label_names=LABELS)
    warnings = task.warnings(biased, task.reference(held_out), held_out)  # the round's line and the final summary
    assert any(w.startswith("finds only 77 of 342 'rotten' rows") for w in warnings)


def test_a_run_whose_test_loss_rises_well_above_the_untrained_models_is_warned_about_as_diverging():
    initial = {"loss": 0.6931, "accuracy": 0.5}
    assert divergence_warnings({"loss": 0.5, "accuracy": 0.7}, initial) == []
    assert divergence_warnings({"loss": 1.0, "accuracy": 0.5}, initial) == []  # worse, but under 1.5x
    assert divergence_warnings({"loss": 3.15, "accuracy": 0.4}, initial) == [
        "has a test loss of 3.1500, 4.5x the untrained model's 0.6931: the run is diverging (try a lower learning-rate)"
    ]
    assert divergence_warnings({"loss": float("nan")}, initial) == [
        "has a test loss of nan: the run has diverged (try a lower learning-rate)"
    ]
    assert divergence_warnings({"accuracy": 0.5}, initial) == []  # a task without a loss is not judged


def test_a_round_in_flight_prints_progress_with_an_eta(capsys):
    configure_logging()
    with RoundProgress("round 2/3", expected_s=100.0, interval_s=0.05):
        time.sleep(0.2)
    out = capsys.readouterr().out
    assert "round 2/3 | running: 0s [" in out and "s left (ETA " in out
    progress = RoundProgress("round 3/3", expected_s=10.0)
    assert "longer than the 10s earlier rounds took" in progress.line(12.0)
    assert RoundProgress("round 1/3").line(31.0) == "round 1/3 | running: 31s"  # no earlier round: no guess


def test_a_center_from_too_few_rows_is_not_used():
    cfg = RunConfig()
    # the issue's run: 5 sites, ~2,900 training rows, hidden size 384, a center of norm ~1.7
    assert center_error(cfg, rows=2900, sites=5, hidden_size=384) < CENTER_MAX_ERROR * 1.7
    assert center_error(cfg, rows=425, sites=10, hidden_size=384) > CENTER_MAX_ERROR * 1.7
    old = RunConfig(center_noise_multiplier=20.0)  # the old default was noise at these sizes
    assert center_error(old, rows=2900, sites=5, hidden_size=384) > CENTER_MAX_ERROR * 1.7
    assert center_error(RunConfig(dp=False, center_noise_multiplier=0.0), rows=10, sites=5, hidden_size=384) == 0


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['data-path="/nonexistent/reviews.csv"'], "data file not found: /nonexistent/reviews.csv"),
        (["text-column=body"], "text-column 'body' not found"),
        (['labels="good,bad"'], "unknown label(s)"),
        (['model-path="/nonexistent/model"'], "is not a local directory"),
        (['resume="/nonexistent/run"', 'sim-dir="x"'], "no checkpoint to resume from"),
    ],
)
def test_bad_data_model_or_resume_fail_before_flower_starts_and_leave_nothing(
    tiny_config, tmp_path, capsys, sets, message
):
    out = tmp_path / "runs"
    base = [f"data-path={json.dumps(tiny_config.data_path)}", f"model-path={json.dumps(tiny_config.model_path)}"]
    base += ['labels="rotten,fresh"']
    args = ["simulate", "--num-clients", "3", "--output-dir", str(out)]
    for pair in base + sets:
        args += ["--set", pair]
    started = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - started < 10  # no Ray start-up (that alone takes 10+ s)
    assert message in capsys.readouterr().err
    assert not out.exists()  # no run dir, no keys


def test_too_many_sites_for_the_rows_fail_before_flower(tmp_path, tiny_model_dir, capsys):
    data = write_csv(tmp_path / "few.csv", make_rows(12))
    args = ["simulate", "--num-clients", "20", "--output-dir", str(tmp_path / "runs")]
    args += ["--set", f"data-path={json.dumps(str(data))}", "--set", f"model-path={json.dumps(str(tiny_model_dir))}"]
    assert main(args) == 2
    assert "20 sites" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_sites_too_small_for_local_dp_noise_are_warned_about_before_flower(tmp_path, tiny_model_dir, caplog):
    data = write_csv(tmp_path / "600.csv", make_rows(600))
    cfg = RunConfig(data_path=str(data), model_path=str(tiny_model_dir), labels="rotten,fresh", max_length=16)
    with caplog.at_level(logging.WARNING, logger="privatune"):
        preflight(cfg, num_clients=10)  # 510 training rows over 10 sites
        warned = [r.getMessage() for r in caplog.records if "training rows" in r.getMessage()]
        assert len(warned) == 1 and "the smallest of the 10 sites holds 5" in warned[0]
        assert int(warned[0].split(" holds ")[1].split()[0]) < SMALL_SITE_ROWS
        caplog.clear()
        preflight(cfg, num_clients=3)  # 170 rows each
        preflight(RunConfig(**{**cfg.__dict__, "dp": False, "target_epsilon": 0.0}), num_clients=10)  # no DP noise
    assert "training rows" not in caplog.text


def test_device_cuda_without_a_gpu_fails_before_flower(tiny_config, tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["simulate", "--num-clients", "3", "--device", "cuda", "--output-dir", str(tmp_path / "runs")]
    args += ["--set", f"data-path={json.dumps(tiny_config.data_path)}", "--set", 'labels="rotten,fresh"']
    args += ["--set", f"model-path={json.dumps(tiny_config.model_path)}"]
    assert main(args) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_a_failed_run_is_removed_only_if_nothing_was_recorded(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    keys_only = cfg.run_dir(1) / "federation" / "sites" / "site-0"
    keys_only.mkdir(parents=True)
    (keys_only / "identity_ed25519.pem").write_text("key")
    (keys_only / "privacy_ledger.jsonl").write_text("")  # opened, nothing recorded
    assert discard_failed_run(cfg, 1) and not cfg.run_dir(1).exists()
    spent = cfg.run_dir(2) / "federation" / "sites" / "site-0"
    spent.mkdir(parents=True)
    (spent / "privacy_ledger.jsonl").write_text('{"round": 0}\n')  # a DP release was recorded: kept
    assert not discard_failed_run(cfg, 2) and spent.is_dir()
    (cfg.run_dir(3)).mkdir()
    (cfg.run_dir(3) / "metrics.json").write_text("{}")
    assert not discard_failed_run(cfg, 3)


def test_evaluate_prints_metrics_the_baseline_and_the_confusion_matrix(tiny_model_dir, tmp_path, capsys):
    adapter = make_tiny_adapter(tiny_model_dir, tmp_path / "run")[0]
    data = write_csv(tmp_path / "test.csv", make_rows(30))
    result = evaluate_adapter(adapter, data)
    assert result.rows == 30 and result.label_names == tuple(LABELS)
    confusion = np.array(result.confusion)
    assert confusion.sum() == 30
    assert result.metrics["accuracy"] == pytest.approx(np.trace(confusion) / 30)
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "majority baseline (always " in out and "confusion matrix (rows: true label" in out
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["confusion_matrix"] == result.confusion and report["metrics"] == result.metrics


def _leaning_adapter(tiny_model_dir: Path, out: Path, *, toward: int) -> Path:
    """The tiny adapter with its head's bias pushed hard toward one label: it predicts that label for every row."""
    from safetensors.torch import load_file, save_file

    adapter = make_tiny_adapter(tiny_model_dir, out)[0]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (bias,) = [k for k in weights if k.endswith("classifier.bias")]
    weights[bias] = torch.full_like(weights[bias], -50.0)
    weights[bias][toward] = 50.0
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    return adapter


def test_evaluate_gives_each_labels_recall_and_warns_about_a_label_the_adapter_never_finds(
    tiny_model_dir, tmp_path, capsys
):
    adapter = _leaning_adapter(tiny_model_dir, tmp_path / "run", toward=LABELS.index("fresh"))
    data = write_csv(tmp_path / "test.csv", make_rows(60))  # 30 rows of each label

    result = evaluate_adapter(adapter, data)

    assert result.metrics["per_class"] == {
        "rotten": {"rows": 30, "found": 0, "recall": 0.0},
        "fresh": {"rows": 30, "found": 30, "recall": 1.0},
    }
    assert result.warnings[:2] == [
        "predicts 'fresh' for 100% of the test rows",
        f"finds only 0 of 30 'rotten' rows (recall 0.0000), against recall 1.0000 for 'fresh': {LOW_RECALL_ADVICE}",
    ]
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "recall per label (the majority baseline finds every 'rotten' row and no other):" in out  # a 30/30 tie
    assert "  rotten  0.0000  (0 of 30)" in out and "   fresh  1.0000  (30 of 30)" in out
    assert "WARNING: the model finds only 0 of 30 'rotten' rows" in out


def test_evaluate_refuses_labels_the_adapter_does_not_know(tiny_model_dir, tmp_path, capsys):
    adapter = make_tiny_adapter(tiny_model_dir, tmp_path / "run")[0]
    data = write_csv(tmp_path / "test.csv", [("fine", "fresh"), ("odd", "meh")])
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(data)]) == 2
    assert "label(s) ['meh'] are not the adapter's labels ['rotten', 'fresh']" in capsys.readouterr().err


def test_resume_of_a_dir_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_logging_is_quiet_about_progress_when_the_round_is_fast(capsys):
    configure_logging()
    logging.getLogger("privatune").info("x")
    with RoundProgress("round 1/1", interval_s=5.0):
        pass
    assert "running" not in capsys.readouterr().out


def test_the_summary_names_the_baseline_both_adapters_and_a_one_class_final_model(tmp_path):
    from shared.simulation import summary

    test = {"loss": 0.7, "accuracy": 0.6, "precision": 0.3, "recall": 0.5, "macro_f1": 0.375}
    best = {**test, "accuracy": 0.7, "macro_f1": 0.66}
    metrics = {
        "run_id": "7",
        "config": {"delta": 1e-5},
        "label_names": ["neg", "pos"],
        "majority_baseline": {"accuracy": 0.6, "macro_f1": 0.375, "class": 1},
        "rounds": [{"round": 2, "test": best, "clients": {}}, {"round": 3, "test": test, "clients": {}}],
        "best": {"round": 2, "by": "macro_f1", "test": best, "dir": str(tmp_path / "adapter-best")},
        "adapters": {
            "final": {"dir": str(tmp_path / "adapter"), "round": 3},
            "best": {"dir": str(tmp_path / "adapter-best"), "round": 2},
        },
        "final_warnings": ["predicts 'pos' for 100% of the test rows"],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    text = summary(tmp_path)
    assert "majority baseline (always 'pos'): accuracy 0.6000  macro-F1 0.3750" in text
    assert "final test (round 3): accuracy 0.6000" in text
    assert "best round 2 (by macro-F1 on the server's held-out test set): accuracy 0.7000" in text
    assert "WARNING: the final model predicts 'pos' for 100% of the test rows" in text
    assert "WARNING: round 2 did better: use the best-round adapter below" in text
    assert f"final adapter (round 3): {tmp_path / 'adapter'}" in text
    assert f"best-round adapter (round 2): {tmp_path / 'adapter-best'}" in text
    metrics["best"]["test"] = metrics["rounds"][1]["test"]  # a tie: the earlier round is kept, but is no better
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "did better" not in summary(tmp_path)


def test_the_summary_gives_each_labels_recall_under_the_final_and_a_better_best_round(tmp_path):
    from shared.simulation import summary

    y_true, y_pred = _issue_25_model()
    final = {**classification_metrics(y_true, y_pred, num_classes=2), "loss": 0.6}
    final["per_class"] = class_recall(y_true, y_pred, label_names=LABELS)
    best = {**final, "macro_f1": 0.7, "per_class": class_recall(y_true, y_true, label_names=LABELS)}
    metrics = {
        "run_id": "7",
        "config": {"delta": 1e-5},
        "label_names": LABELS,
        "majority_baseline": majority_baseline(y_true, num_classes=2),
        "rounds": [{"round": 2, "test": best, "clients": {}}, {"round": 3, "test": final, "clients": {}}],
        "best": {"round": 2, "by": "macro_f1", "test": best, "dir": str(tmp_path / "adapter-best")},
        "final_warnings": quality_warnings(final, majority_baseline(y_true, num_classes=2), LABELS),
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))

    lines = summary(tmp_path).splitlines()

    assert lines[1] == "majority baseline (always 'fresh'): accuracy 0.5778  macro-F1 0.3662"
    assert lines[2].startswith("final test (round 3): accuracy 0.6728")
    assert lines[3] == "  recall per label: 'rotten' 0.2251 (77 of 342)  'fresh' 1.0000 (468 of 468)"
    assert lines[5] == "  recall per label: 'rotten' 1.0000 (342 of 342)  'fresh' 1.0000 (468 of 468)"  # round 2's
    assert lines[6].startswith("WARNING: the final model finds only 77 of 342 'rotten' rows (recall 0.2251)")


def _checkpointed_run(tmp_path: Path, *, server_round: int, rounds: int) -> Path:
    from server.checkpoint import Checkpoint, save_checkpoint

    run_dir = tmp_path / "runs" / "run-5"
    run_dir.mkdir(parents=True)
    config = {**RunConfig().to_flower(), "num-server-rounds": rounds, "sim-dir": str(run_dir / "federation")}
    history = {"feature_centering": {"sampled": ["site-0", "site-1", "site-2", "site-3"]}, "rounds": []}
    rng = np.random.default_rng(0)
    ckpt = Checkpoint("5", [], server_round, config, dict(rng.bit_generator.state), history, None, {"b": np.zeros(2)})
    save_checkpoint(run_dir, ckpt)
    return run_dir


def test_resume_reruns_the_checkpointed_config_with_as_many_sites(tmp_path, monkeypatch, capsys):
    import shared.simulation

    run_dir = _checkpointed_run(tmp_path, server_round=1, rounds=3)
    calls = []

    def fake_run(overrides, **kwargs):
        calls.append((overrides, kwargs))
        return run_dir

    monkeypatch.setattr(shared.simulation, "run_simulation", fake_run)
    monkeypatch.setattr(shared.simulation, "summary", lambda d: f"summary of {d}")
    assert main(["resume", str(run_dir), "--device", "cpu"]) == 0
    ((overrides, kwargs),) = calls
    assert overrides["resume"] == str(run_dir.resolve()) and overrides["num-server-rounds"] == 3
    assert overrides["sim-dir"] == str(run_dir / "federation")
    assert kwargs["num_clients"] == 4 and kwargs["site_settings"] == {"device": "cpu"}
    assert "resuming run 5 after its round 1 with 4 sites" in capsys.readouterr().out


def test_resume_of_a_finished_run_says_there_is_nothing_to_resume(tmp_path, capsys):
    run_dir = _checkpointed_run(tmp_path, server_round=3, rounds=3)
    (run_dir / "metrics.json").write_text(json.dumps({"adapters": {"final": {"round": 3}}}))
    assert main(["resume", str(run_dir)]) == 2
    assert "finished all its 3 rounds: nothing to resume" in capsys.readouterr().err
