"""The Task contract (shared/tasks/base.py), written once and run against every registered task.

Each task gets a tiny setup (conftest's tiny random model and rows, nothing downloaded): rows load, subset
and stratify; encoding keeps one row per input; the loss is a scalar with gradients and the mean of the rows' own
losses (what Opacus's per-sample clipping needs); the server's evaluator returns a finite loss; the adapter is saved
and published. A task whose module is not in this checkout yet is skipped, not passed.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared.config import RunConfig
from shared.tasks import TASK_CLASSES, TaskError, get_task
from shared.tasks.base import Rows
from shared.tasks.presets import TASK_PRESETS

TASKS = sorted(TASK_CLASSES)


# Each task's tiny setup is a conftest fixture: a 2-layer, 32-wide random model (BERT; Llama) with the MiniLM
# tokenizer and 240 rows (labelled CSV; prompt/response JSONL).
SETUPS: dict[str, str] = {
    "classify": "tiny_config",
    "causal-lm": "tiny_causal_config",
}


@pytest.fixture(params=TASKS)
def setup(request: pytest.FixtureRequest):
    name = request.param
    module, _ = TASK_CLASSES[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module.replace('.', '/')}.py is not in this checkout yet")
    assert name in SETUPS, f"task {name!r} has no tiny setup in this contract test: add one"
    cfg: RunConfig = request.getfixturevalue(SETUPS[name])
    return get_task(cfg), cfg


def test_every_registered_task_has_a_setup_and_presets_here():
    assert set(TASKS) == set(SETUPS) == set(TASK_PRESETS)


def test_the_task_is_the_one_its_config_names(setup):
    task, cfg = setup
    assert task.name == cfg.task
    assert dict(task.presets) == dict(TASK_PRESETS[task.name])
    assert task.best_by and isinstance(task.best_by, str)
    for capability in ("centering", "canary_audit", "site_evaluation"):
        assert hasattr(task, capability)  # None where the task lacks it
    task.check_model(cfg)
    with pytest.raises(ValueError):
        task.check_model(RunConfig(task=cfg.task, model_path=str(Path(cfg.output_dir) / "no-such-model")))


def test_rows_load_subset_keep_order_and_stratify(setup):
    task, cfg = setup
    rows = task.load_run_rows(cfg)
    assert isinstance(rows, Rows)
    assert len(rows) > 10 and rows.source
    every = list(rows.rows())
    assert len(every) == len(rows)
    sub = rows.subset([3, 1])
    assert len(sub) == 2
    assert list(sub.rows()) == [every[3], every[1]]
    strata = rows.strata
    assert strata.shape == (len(rows),) and strata.dtype == np.int64
    assert np.array_equal(sub.strata, strata[[3, 1]])


def test_encoding_gives_one_input_per_row_within_max_length(setup):
    task, cfg = setup
    rows = task.load_run_rows(cfg).subset(range(5))
    enc = task.encode(cfg, rows)
    assert len(enc) == 5
    assert enc.input_ids.shape[1] <= cfg.max_length
    assert enc.attention_mask.shape == enc.input_ids.shape
    assert enc.labels.shape[0] == 5


def _row(enc, i: int):
    return type(enc)(enc.input_ids[i : i + 1], enc.attention_mask[i : i + 1], enc.labels[i : i + 1])


def test_the_loss_is_a_scalar_with_gradients_and_the_mean_of_the_rows_own_losses(setup):
    """Per-sample clipping needs each row's gradient to be its own: the batch's loss is the mean over rows of
    each row's loss, never a mean over the batch's tokens (rows of different lengths would weigh differently)."""
    import torch

    task, cfg = setup
    rows = task.load_run_rows(cfg)
    model = task.fresh_model(cfg, rows)
    model.eval()  # no dropout: the two computations must see the same model
    enc = task.encode(cfg, rows.subset([0, 1]))
    loss = task.loss(model, enc)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)
    with torch.no_grad():
        each = [float(task.loss(model, _row(enc, i))) for i in range(2)]
        both = float(task.loss(model, enc))
    assert both == pytest.approx(sum(each) / 2, rel=1e-4, abs=1e-5)


def test_the_evaluator_returns_finite_json_metrics_and_the_task_describes_them(setup):
    task, cfg = setup
    rows = task.load_run_rows(cfg)
    held_out = rows.subset(range(8))
    metrics = task.evaluator(cfg, held_out)(task.fresh_model(cfg, rows))
    assert math.isfinite(metrics["loss"])
    assert task.best_by in metrics and math.isfinite(task.score(metrics))
    reference = task.reference(held_out)
    json.dumps([metrics, reference, task.history_fields(held_out, reference)], allow_nan=False)
    line = task.describe(metrics, reference)
    assert isinstance(line, str) and "\n" not in line and "loss" in line
    assert all(isinstance(w, str) for w in task.warnings(metrics, reference, held_out))


def test_the_adapter_is_saved_and_published_without_local_paths(setup, tmp_path):
    task, cfg = setup
    rows = task.load_run_rows(cfg)
    model = task.fresh_model(cfg, rows)
    held_out = rows.subset(range(8))
    test = task.evaluator(cfg, held_out)(model)
    card = {"base_model": cfg.model_path, "max_length": cfg.max_length, "round": 0, "adapter": "final", "test": test}
    out = task.save_adapter(model, tmp_path / "adapter", card=card)
    assert out == tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file()
    assert any(out.glob("adapter_model.*"))
    saved = json.loads((out / "privatune.json").read_text())
    assert {k: saved[k] for k in card if k != "test"} == {k: v for k, v in card.items() if k != "test"}
    reference = task.reference(held_out)
    history = {
        "run_id": "1",
        "config": cfg.to_flower(),
        **task.history_fields(held_out, reference),
        "initial_test": test,
        "rounds": [],
    }
    task.publish(out, model, cfg=cfg, history=history, run_records=[])
    assert (out / "README.md").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert str(tmp_path) not in json.dumps(adapter_config)  # the base model is named, not its local directory


def test_a_saved_adapter_is_evaluated_on_a_file_of_the_tasks_rows(setup, tmp_path):
    """``privatune evaluate`` for every task: the card names the task, and the task scores the adapter on a file
    of its own format (here the first rows of the run's file) next to its reference."""
    from shared.evaluation import evaluate_adapter

    task, cfg = setup
    rows = task.load_run_rows(cfg)
    card = {"base_model": cfg.model_path, "max_length": cfg.max_length, "round": 0, "adapter": "final"}
    out = task.save_adapter(task.fresh_model(cfg, rows), tmp_path / "adapter", card=card)
    assert json.loads((out / "privatune.json").read_text())["task"] == task.name

    result = evaluate_adapter(out, cfg.data_path, max_rows=8)

    report = result.to_json()
    json.dumps(report, allow_nan=False)
    assert report["task"] == task.name and report["rows"] == 8 and math.isfinite(report["metrics"][task.best_by])
    assert isinstance(result.report(), str) and all(isinstance(w, str) for w in result.warnings)
    with pytest.raises(ValueError, match="--max-rows must be at least 1, got 0"):
        evaluate_adapter(out, cfg.data_path, max_rows=0)


def test_an_unknown_task_or_a_missing_task_module_is_a_clear_error(monkeypatch):
    with pytest.raises(TaskError, match="unknown task 'regression'"):
        get_task("regression")
    monkeypatch.setitem(TASK_CLASSES, "classify", ("shared.tasks.no_such_task", "NoSuchTask"))
    with pytest.raises(TaskError, match=r"shared/tasks/no_such_task\.py"):
        get_task("classify")


def test_the_capabilities_a_task_has_work_on_its_model(setup):
    """Optional capabilities (None where a task lacks them): the center round-trips through the model, a site's
    evaluation release is a DP event and JSON numbers."""
    task, cfg = setup
    rows = task.load_run_rows(cfg)
    model = task.fresh_model(cfg, rows)
    if task.centering is not None:
        center = task.centering.get_center(model)
        assert center.ndim == 1 and not center.any()  # zeros before round 0
        task.centering.set_center(model, center + 0.5)
        assert np.allclose(task.centering.get_center(model), center + 0.5)
    if task.site_evaluation is not None:
        assert task.site_evaluation.event(20.0).noise_multiplier == 20.0
        some = rows.subset(range(6))
        released = task.site_evaluation.release(
            model, task.encode(cfg, some), some, noise_multiplier=20.0, device="cpu"
        )
        json.dumps(released, allow_nan=False)
    if task.canary_audit is not None:
        assert task.canary_audit.start(model, cfg, rows, num_sites=3) is None  # canaries = 0: no audit
