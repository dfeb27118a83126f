"""Choosing a task: the run config's ``task`` and its presets, the settings a task cannot honour, a deployed
site's own ``task`` (a run of another task is refused), and the loops' refusal of a capability the task lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_policy import SitePolicyError, check_node_config, check_site_policy
from shared.config import ConfigError, RunConfig
from shared.site import SiteConfigError, site_from_node_config
from shared.tasks.presets import TASK_PRESETS


def test_the_classifier_is_the_default_and_has_no_presets():
    assert RunConfig().task == "classify"
    assert RunConfig.from_flower({}) == RunConfig()
    assert TASK_PRESETS["classify"] == {}


def test_a_tasks_presets_replace_only_the_keys_left_at_the_default():
    cfg = RunConfig.from_flower({"task": "causal-lm", "batch-size": 16})
    flat = cfg.to_flower()
    for key, value in TASK_PRESETS["causal-lm"].items():
        if key != "batch-size":
            assert flat[key] == value, key
    assert cfg.batch_size == 16  # set by the run: kept
    assert not cfg.center_features


def test_presets_are_idempotent_so_server_and_sites_agree():
    """A run config that already holds the presets (what the server records and every site reads) converts to
    the same values again."""
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), "task": "causal-lm"})
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert RunConfig(task="causal-lm") == cfg


def test_an_unknown_task_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="task must be one of"):
        RunConfig.from_flower({"task": "regression"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("partitioning", "dirichlet"),
        ("classifier-pooling", "cls"),
        ("labels", "neg,pos"),
    ],
)
def test_settings_the_causal_task_cannot_honour_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"{key} = .* does not apply to task = 'causal-lm'"):
        RunConfig.from_flower({"task": "causal-lm", key: value})
    RunConfig.from_flower({key: value, **({"center-features": False} if key == "classifier-pooling" else {})})


def test_text_canaries_are_the_classifiers_and_gradient_canaries_any_tasks():
    with pytest.raises(ConfigError, match="canaries = 5 does not apply to task = 'causal-lm': text canaries"):
        RunConfig.from_flower({"task": "causal-lm", "canaries": 5, "canary-kind": "text"})

    assert RunConfig.from_flower({"task": "causal-lm", "canaries": 5}).canary_kind == "gradient"


def test_a_causal_run_is_never_centered():
    assert not RunConfig(task="causal-lm").center_features  # the preset: the causal LM has no head to center


# -- a deployed site's task ----------------------------------------------------------------------------------------


def _node_config(tmp_path: Path, **extra) -> dict:
    return {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": str(tmp_path / "notes.jsonl"),
        "max-epsilon": 8.0,
        "delta": 1e-5,
        "accountant": "prv",
        **extra,
    }


def _check(tmp_path: Path, cfg: RunConfig, **extra) -> None:
    node_config = _node_config(tmp_path, **extra)
    check_site_policy(cfg, site_from_node_config(node_config, sim_dir=tmp_path), node_config)


def test_a_site_without_a_task_key_is_a_classifier_site(tmp_path):
    site = site_from_node_config(_node_config(tmp_path, labels="neg,pos"), sim_dir=tmp_path)
    assert site.task == "classify"
    _check(tmp_path, RunConfig(labels="neg,pos"), labels="neg,pos")


def test_a_causal_site_needs_no_labels_and_takes_a_causal_run(tmp_path):
    node_config = _node_config(tmp_path, task="causal-lm")
    check_node_config(node_config)
    site = site_from_node_config(node_config, sim_dir=tmp_path)
    assert (site.task, site.labels) == ("causal-lm", None)
    _check(tmp_path, RunConfig(task="causal-lm"), task="causal-lm")  # its default data-path names the server's


def test_a_classifier_site_still_needs_its_labels(tmp_path):
    with pytest.raises(SiteConfigError, match="must set 'labels'"):
        site_from_node_config(_node_config(tmp_path), sim_dir=tmp_path)


@pytest.mark.parametrize("key", ["labels", "text-column", "label-column"])
def test_a_classifier_key_on_a_causal_site_is_an_error(tmp_path, key):
    with pytest.raises(SiteConfigError, match=f"'{key}'.* do\\(es\\) not apply to its task 'causal-lm'"):
        site_from_node_config(_node_config(tmp_path, task="causal-lm", **{key: "x,y"}), sim_dir=tmp_path)


def test_an_unknown_site_task_is_an_error(tmp_path):
    with pytest.raises(SiteConfigError, match="'task' must be one of"):
        site_from_node_config(_node_config(tmp_path, task="regression", labels="neg,pos"), sim_dir=tmp_path)


def test_a_run_of_another_task_is_refused_by_the_site(tmp_path):
    """A malicious server must not get a site's rows read and released under a task its operator did not declare."""
    with pytest.raises(
        SitePolicyError, match="run config task='causal-lm', but this site's data is for task='classify'"
    ):
        _check(tmp_path, RunConfig(task="causal-lm"), labels="neg,pos")
    with pytest.raises(
        SitePolicyError, match="run config task='classify', but this site's data is for task='causal-lm'"
    ):
        _check(tmp_path, RunConfig(labels=""), task="causal-lm")


def test_the_train_handler_declines_a_run_of_another_task(tmp_path, tiny_config):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.app import train
    from shared import constants as C

    node_config = _node_config(tmp_path, task="causal-lm")
    context = Context(
        run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=tiny_config.to_flower()
    )
    msg = Message(
        RecordDict({C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: "7"})}),
        dst_node_id=1,
        message_type="train",
    )
    reason = str(train(msg, context).content[C.DECLINE_RECORD]["reason"])
    assert "run config task='classify', but this site's data is for task='causal-lm'" in reason
    assert not (tmp_path / "privacy_ledger.jsonl").exists()  # declined before anything was read or recorded


# -- capabilities ---------------------------------------------------------------------------------------------


class _NoCapabilities:
    """A task with none of the optional capabilities (what the loops see of, e.g., the causal LM)."""

    name = "bare"
    centering = None
    canary_audit = None
    site_evaluation = None


def test_the_server_refuses_a_run_asking_for_a_capability_the_task_lacks():
    from server.app import capabilities

    with pytest.raises(ConfigError, match="center-features = true: task 'bare' has no feature centering"):
        capabilities(RunConfig(), _NoCapabilities())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="canaries = 3, canary-kind = 'text': task 'bare' has no text canaries"):
        capabilities(RunConfig(center_features=False, canaries=3, canary_kind="text"), _NoCapabilities())  # type: ignore[arg-type]
    assert capabilities(RunConfig(center_features=False, canaries=3), _NoCapabilities()) == (None, None)  # type: ignore[arg-type]
    assert capabilities(RunConfig(center_features=False), _NoCapabilities()) == (None, None)  # type: ignore[arg-type]


def test_a_site_declines_to_evaluate_for_a_task_without_site_evaluation(tmp_path, tiny_config, monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import shared.tasks
    from client.app import evaluate
    from shared import constants as C

    monkeypatch.setattr(shared.tasks, "get_task", lambda cfg: _NoCapabilities())
    node_config = _node_config(tmp_path, labels="rotten,fresh", **{"allow-evaluate": True})
    cfg = tiny_config.to_flower()
    context = Context(
        run_id=7,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={**cfg, "data-path": str(tmp_path / "notes.jsonl")},
    )
    msg = Message(
        RecordDict({C.EVALUATE_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: "7"})}),
        dst_node_id=1,
        message_type="evaluate",
    )
    reason = str(evaluate(msg, context).content[C.DECLINE_RECORD]["reason"])
    assert reason == "task 'bare' has no DP-noised site evaluation: nothing about the rows is released"
