"""A deployed site takes its data, device, budget and ledger from its own node config; a run config that
tries to set them otherwise is refused, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_policy import SitePolicyError, check_node_config, check_site_policy, site_policy_violations
from shared.config import RunConfig
from shared.site import SiteConfigError, site_from_node_config


def _node_config(tmp_path: Path, **extra) -> dict:
    return {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": str(tmp_path / "data.csv"),
        "device": "cpu",
        "max-epsilon": 8.0,
        "delta": 1e-5,
        "accountant": "prv",
        "labels": "neg,pos",
        **extra,
    }


def _check(tmp_path: Path, cfg: RunConfig, **extra) -> None:
    node_config = _node_config(tmp_path, **extra)
    check_site_policy(cfg, site_from_node_config(node_config, sim_dir=tmp_path), node_config)


def test_default_run_config_is_accepted(tmp_path):
    _check(tmp_path, RunConfig(labels="neg,pos"))


def test_run_config_naming_the_sites_own_data_path_is_accepted(tmp_path):
    _check(tmp_path, RunConfig(data_path=str(tmp_path / "data.csv"), labels="neg,pos"))


@pytest.mark.parametrize("labels", ["pos,neg", "neg,pos,other", ""])
def test_run_config_with_another_label_set_or_order_is_refused(tmp_path, labels):
    with pytest.raises(
        SitePolicyError, match=f"run config labels='{labels}' differs from this site's labels='neg,pos'"
    ):
        _check(tmp_path, RunConfig(labels=labels))


def test_run_config_columns_and_accountant_are_not_the_sites_and_are_ignored(tmp_path):
    _check(tmp_path, RunConfig(labels="neg,pos", text_column="review", label_column="stars", accountant="rdp"))


def test_run_config_asking_for_another_data_path_is_refused(tmp_path):
    with pytest.raises(SitePolicyError, match="site hospital-a refuses the run: run config data-path='/elsewhere.csv'"):
        _check(tmp_path, RunConfig(data_path="/elsewhere.csv", labels="neg,pos"))


def test_run_config_asking_for_a_larger_budget_is_refused(tmp_path):
    with pytest.raises(SitePolicyError, match="target-epsilon=16 exceeds this site's max-epsilon=8"):
        _check(tmp_path, RunConfig(target_epsilon=16.0, labels="neg,pos"))


def test_run_config_asking_for_a_larger_delta_is_refused(tmp_path):
    with pytest.raises(SitePolicyError, match="delta=0.001 exceeds this site's delta=1e-05"):
        _check(tmp_path, RunConfig(delta=1e-3, labels="neg,pos"))


def test_non_private_run_is_refused_by_a_site_with_a_budget(tmp_path):
    with pytest.raises(SitePolicyError, match="dp=false"):
        _check(tmp_path, RunConfig(dp=False, labels="neg,pos"))


def test_sim_dir_is_refused_by_a_deployed_site(tmp_path):
    with pytest.raises(SitePolicyError, match="sim-dir='/tmp/x' is for simulations"):
        _check(tmp_path, RunConfig(sim_dir="/tmp/x", labels="neg,pos"))


def test_reproducible_noise_needs_the_sites_consent(tmp_path):
    cfg = RunConfig(reproducible_noise=True, labels="neg,pos")

    with pytest.raises(SitePolicyError, match="allow-reproducible-noise = true"):
        _check(tmp_path, cfg)
    _check(tmp_path, cfg, **{"allow-reproducible-noise": True})


def test_every_violation_is_named_at_once(tmp_path):
    node_config = _node_config(tmp_path)
    cfg = RunConfig(data_path="/x.csv", target_epsilon=20.0, labels="neg,pos")

    found = site_policy_violations(cfg, site_from_node_config(node_config, sim_dir=tmp_path), node_config)

    assert len(found) == 2


def test_simulated_sites_are_not_checked(tmp_path):
    node_config = {"partition-id": 0, "num-partitions": 2}

    check_site_policy(RunConfig(data_path="/x.csv"), site_from_node_config(node_config, sim_dir=tmp_path), node_config)


def test_unknown_node_config_key_is_refused(tmp_path):
    with pytest.raises(SiteConfigError, match=r"unknown key\(s\) \['ledger'\]"):
        check_node_config(_node_config(tmp_path, ledger="x"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("allow-evaluate", "yes", "'allow-evaluate' must be true or false, got 'yes'"),
        ("evaluate-noise-multiplier", 0.0, "'evaluate-noise-multiplier' must be finite and > 0, got 0.0"),
        ("accountant", "moments", "'accountant' must be one of ['prv', 'rdp'], got 'moments'"),
        ("labels", "only-one", "'labels' must name at least 2 distinct labels, got 'only-one'"),
        ("data-source", "", "'data-source' must be a non-empty string, got ''"),
    ],
)
def test_bad_new_site_setting_is_refused_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(SiteConfigError) as err:
        site_from_node_config(_node_config(tmp_path, **{key: value}), sim_dir=tmp_path)
    assert message in str(err.value)


def test_every_node_config_key_is_known_to_the_policy(tmp_path):
    node_config = _node_config(
        tmp_path,
        **{
            "data-source": "notes-2024",
            "text-column": "note",
            "label-column": "outcome",
            "allow-evaluate": True,
            "evaluate-noise-multiplier": 30.0,
        },
    )
    check_node_config(node_config)
    site = site_from_node_config(node_config, sim_dir=tmp_path)
    assert (site.data_source, site.text_column, site.label_column, site.labels) == (
        "notes-2024",
        "note",
        "outcome",
        ("neg", "pos"),
    )
    assert (site.allow_evaluate, site.evaluate_noise_multiplier, site.accounting()) == (True, 30.0, (1e-5, "prv"))


def test_non_boolean_consent_is_refused(tmp_path):
    with pytest.raises(SiteConfigError, match="'allow-reproducible-noise' must be true or false, got 'yes'"):
        check_node_config(_node_config(tmp_path, **{"allow-reproducible-noise": "yes"}))


def test_the_train_handler_declines_with_the_reason(tmp_path, tiny_config):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app import RecordDict as RD

    from client.app import train
    from shared import constants as C

    node_config = _node_config(tmp_path, labels="rotten,fresh")
    cfg = RunConfig.from_flower({**tiny_config.to_flower(), "target-epsilon": 50.0})
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RD(), run_config=cfg.to_flower())
    msg = Message(
        RecordDict({C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: "7"})}),
        dst_node_id=1,
        message_type="train",
    )

    reply = train(msg, context)

    reason = str(reply.content[C.DECLINE_RECORD]["reason"])
    assert "data-path=" in reason and "target-epsilon=50 exceeds this site's max-epsilon=8" in reason
