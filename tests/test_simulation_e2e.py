"""The whole stack on a tiny model: Flower's simulation runtime (Ray), 3 sites x 2 rounds, DP on."""

import json

import pytest
from peft import PeftModel

from shared.config import RunConfig
from shared.federation import load_run_dataset, server_test_set
from shared.ledger import SiteLedger
from shared.metrics import evaluate_model
from shared.model import encode, load_base_model, load_tokenizer
from shared.simulation import run_simulation, summary
from tests.conftest import simulation_overrides

pytestmark = pytest.mark.slow


def _reload_accuracy(run_dir, cfg: RunConfig, num_clients: int, adapter: str = "adapter") -> float:
    card = json.loads((run_dir / adapter / "privatune.json").read_text())
    assert card["classifier_pooling"] == cfg.classifier_pooling
    base = load_base_model(cfg.model_path, num_labels=2, pooling=card["classifier_pooling"])
    model = PeftModel.from_pretrained(base, str(run_dir / adapter))  # plain peft from here on
    test = server_test_set(cfg, load_run_dataset(cfg), num_clients)
    data = encode(load_tokenizer(cfg.model_path), test.texts, test.labels, max_length=cfg.max_length)
    return evaluate_model(model, data, num_classes=2)["accuracy"]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_three_sites_two_rounds_end_to_end(tiny_config, secure, capsys):
    overrides = simulation_overrides(tiny_config, **{"secure-aggregation": secure})
    run_dir = run_simulation(overrides, num_clients=3)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert sorted(r["survivors"]) == ["site-0", "site-1", "site-2"]
        assert not r["aborted"] and r["secure_aggregation"] is secure
        assert set(r["test"]) == {
            "loss",
            "accuracy",
            "precision",
            "recall",
            "macro_f1",
            "top_class",
            "top_class_share",
            "per_class",
        }
        assert list(r["test"]["per_class"]) == metrics["label_names"]  # each label's rows, found and recall
    eps_round1 = [c["epsilon"] for c in metrics["rounds"][0]["clients"].values()]
    eps_round2 = [c["epsilon"] for c in metrics["rounds"][1]["clients"].values()]
    assert all(0 < a < b for a, b in zip(eps_round1, eps_round2, strict=True))  # cumulative, not per round
    assert max(eps_round2) == pytest.approx(8.0, rel=0.02)  # calibrated to target-epsilon over the 2 rounds

    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **overrides})
    final = metrics["rounds"][-1]["test"]["accuracy"]
    assert _reload_accuracy(run_dir, cfg, 3) == pytest.approx(final, abs=1e-9)
    fed = run_dir / "federation" / "sites"
    ledgers = [SiteLedger(fed / f"site-{i}" / "privacy_ledger.jsonl", site_id=f"site-{i}") for i in range(3)]
    # round 0: the feature-centering query, answered by every site, recorded in its ledger and in the run's
    assert [[e.round for e in ledger.entries()] for ledger in ledgers] == [[0, 1, 2]] * 3
    assert all(ledger.entries()[0].event.sample_rate == 1.0 for ledger in ledgers)
    centering = metrics["feature_centering"]
    assert sorted(centering["survivors"]) == ["site-0", "site-1", "site-2"] and not centering["aborted"]
    assert all(0 < c["epsilon"] < min(eps_round1) for c in centering["clients"].values())
    out = capsys.readouterr().out
    assert f"final adapter (round 2): {run_dir / 'adapter'}" in out  # the server's log ends with the summary
    if centering["center"] is None:  # 240 tiny rows: the center's noise may exceed half its norm (then not used)
        assert centering["expected_noise"] > 0 and "training on the uncentered vector" in out
    else:
        assert len(centering["center"]) == 32
    run_rounds = [json.loads(line)["round"] for line in (run_dir / "run_ledger.jsonl").read_text().splitlines()]
    assert run_rounds == [0, 1, 2]
    text = summary(run_dir)
    assert "final test (round 2): accuracy" in text and "majority baseline (always " in text
    assert "  recall per label: 'rotten' " in text
    best = metrics["best"]
    assert best["round"] in (1, 2) and best["by"] == "macro_f1"
    assert best["test"]["macro_f1"] == max(r["test"]["macro_f1"] for r in metrics["rounds"])
    assert metrics["adapters"]["final"]["round"] == 2 and metrics["adapters"]["best"]["round"] == best["round"]
    best_card = json.loads((run_dir / "adapter-best" / "privatune.json").read_text())
    final_card = json.loads((run_dir / "adapter" / "privatune.json").read_text())
    assert (best_card["adapter"], best_card["round"]) == ("best", best["round"])
    assert (final_card["adapter"], final_card["round"]) == ("final", 2)
    assert f"best-round adapter (round {best['round']}): {run_dir / 'adapter-best'}" in text
    card = (run_dir / "adapter" / "README.md").read_text()  # the model card, from the attested run ledger
    assert "| rounds | 2 of 2 planned |" in card and all(f"| site-{i} | " in card for i in range(3))
    assert (run_dir / "adapter" / "merged" / "head.safetensors").is_file()  # loads without this project
    # the best round's adapter is published too: its export and its card, for its own round
    assert (run_dir / "adapter-best" / "merged" / "head.safetensors").is_file()
    assert f"| this adapter | round {best['round']} (best) |" in (run_dir / "adapter-best" / "README.md").read_text()
    assert _reload_accuracy(run_dir, cfg, 3, "adapter-best") == pytest.approx(best["test"]["accuracy"], abs=1e-9)
    out += capsys.readouterr().out
    assert "round 0 | feature centering: 3/3 sites" in out
    assert "round 1/2 | test loss" in out and "round 2/2" in out and "(majority " in out
    assert "train loss" not in out and all("train_loss" not in r for r in metrics["rounds"])  # DP: none released


def test_canary_mode_runs_through_the_app_and_the_audit_reads_its_scores(tiny_config, tmp_path, capsys):
    from shared.audit.cli import audit_main

    overrides = simulation_overrides(tiny_config, **{"num-server-rounds": 1, "canaries": 16})
    run_dir = run_simulation(overrides, num_clients=3)
    scores = json.loads((run_dir / "canary_scores.json").read_text())
    assert len(scores["canaries"]) == 16 and any(c["included"] for c in scores["canaries"])
    out = tmp_path / "audit"
    code = audit_main(["--sim-dir", str(run_dir / "federation"), "--run-dir", str(run_dir), "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    canary = next(r["canary"] for r in report["runs"] if r.get("canary"))
    # with DP on, the empirical lower bound stays at or below the epsilon the sites claim
    assert canary["epsilon_lower"] <= canary["claimed_epsilon"]
