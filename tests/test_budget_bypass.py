"""A malicious server's run config against a site's budget, through the client's real train handler.

Each test plays one attack of issue 10 (items 3, 4 and 7): a run config that re-prices the site's history at a
looser delta or another accountant, a run config or data change that gives the same people a fresh budget, and
an attestation that would let the server confirm the site's rows. Every one used to work; now it must not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from shared import constants as C
from shared.config import BUILTIN_DATA
from shared.identity import IDENTITY_KEY_FILE, provision_simulation, write_private_key
from shared.ledger import SiteLedger, fingerprint_rows
from shared.model import build_model, get_trainable
from shared.privacy import DpEvent, compose_epsilon
from shared.records import record_from_arrays
from shared.site import SiteConfigError, read_site_settings, site_from_node_config, write_site_settings

RUN_ID = 5151


@pytest.fixture()
def cfg(tiny_config, tmp_path):
    """A fixed noise multiplier (no calibration: fast), no centering round (one DP event per round), and
    simulated sites that outlive a run (their own sim-dir)."""
    cfg = replace(
        tiny_config,
        noise_multiplier=1.0,
        target_epsilon=0.0,
        center_features=False,
        num_server_rounds=40,
        sim_dir=str(tmp_path / "sim"),
    )
    provision_simulation(cfg.simulation_dir(RUN_ID), 3)
    return cfg


def _sim_context(cfg, *, run_id=RUN_ID, partition_id=0):
    return Context(
        run_id=run_id,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 3},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _message(cfg, server_round, *, run_id=RUN_ID, message_type="train"):
    train_config = {C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: str(run_id)}
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.TRAIN_CONFIG_RECORD: ConfigRecord(train_config),
        }
    )
    return Message(content, dst_node_id=100, message_type=message_type)


def _event(reply) -> DpEvent:
    return DpEvent.from_dict({k: v for k, v in reply.content[C.DP_EVENT_RECORD].items() if k != "site-id"})


def _declined(reply) -> str | None:
    record = reply.content.config_records.get(C.DECLINE_RECORD)
    return None if record is None else str(record["reason"])


def _over_budget(reply) -> bool:
    reason = _declined(reply) or ""
    return "declined: this round would raise epsilon" in reason or "budget already spent" in reason


def _sim_site(cfg, partition_id=0):
    return site_from_node_config(
        {"partition-id": partition_id, "num-partitions": 3}, sim_dir=cfg.simulation_dir(RUN_ID)
    )


# -- item 3: delta and accountant are the site's ---------------------------------------------------------------


def test_a_run_config_delta_cannot_reprice_a_simulated_sites_history(cfg):
    # Prepare: one round at delta 1e-5, then a budget that fits one round but not two at that delta
    first = client_app.train(_message(cfg, 1), _sim_context(cfg))
    assert _declined(first) is None
    event = _event(first)
    one, two = (compose_epsilon([event] * n, delta=1e-5, accountant="prv") for n in (1, 2))
    write_site_settings(cfg.simulation_dir(RUN_ID) / "sites" / "site-0", {"max-epsilon": (one + two) / 2})
    assert compose_epsilon([event] * 20, delta=0.5, accountant="prv") < one  # at 0.5, 20 rounds "fit"

    # Execute: the server asks for round 2 with delta = 0.5 (and another accountant)
    loose = replace(cfg, delta=0.5, accountant="rdp")
    reply = client_app.train(_message(loose, 2), _sim_context(loose))

    # Assert: declined at the site's own delta; nothing recorded at the server's
    assert _over_budget(reply) and "delta=1e-05 (prv)" in (_declined(reply) or "")
    entries = SiteLedger(_sim_site(cfg).ledger_path, site_id="site-0").entries()
    assert [(e.round, e.delta, e.accountant) for e in entries] == [(1, 1e-5, "prv")]


def test_a_simulated_site_pins_its_delta_and_accountant_at_first_use(cfg):
    client_app.train(_message(replace(cfg, accountant="rdp"), 1), _sim_context(replace(cfg, accountant="rdp")))

    settings = read_site_settings(cfg.simulation_dir(RUN_ID) / "sites" / "site-0")

    assert (settings["delta"], settings["accountant"]) == (1e-5, "rdp")
    later = replace(cfg, delta=1e-3, accountant="prv")
    reply = client_app.train(_message(later, 2), _sim_context(later))
    assert reply.content.metric_records[C.METRICS_RECORD][C.METRIC_DELTA] == 1e-5
    entries = SiteLedger(_sim_site(cfg).ledger_path, site_id="site-0").entries()
    assert {(e.delta, e.accountant) for e in entries} == {(1e-5, "rdp")}
    assert entries[1].epsilon == pytest.approx(compose_epsilon([_event(reply)] * 2, delta=1e-5, accountant="rdp"))


def _deployed(tmp_path: Path, rows: list[tuple[str, str]], **node) -> dict:
    site_dir = tmp_path / "hospital-a"
    if not (site_dir / IDENTITY_KEY_FILE).exists():
        write_private_key(site_dir / IDENTITY_KEY_FILE, Ed25519PrivateKey.generate())
    data = site_dir / "notes.csv"
    data.write_text("note,outcome\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    base = {
        "site-id": "hospital-a",
        "site-dir": str(site_dir),
        "data-path": str(data),
        "max-epsilon": 8.0,
        "delta": 1e-5,
        "accountant": "prv",
        "text-column": "note",
        "label-column": "outcome",
        "labels": "rotten,fresh",
    }
    return {k: v for k, v in {**base, **node}.items() if v is not None}


def _deployed_context(cfg, node_config, run_id=RUN_ID):
    """A deployed site's context: the run config names no data path or sim dir of its own (the site refuses)."""
    cfg = replace(cfg, data_path=BUILTIN_DATA, sim_dir="")
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())


@pytest.fixture()
def rows():
    from tests.conftest import make_rows

    return make_rows(64, seed=3)


@pytest.mark.parametrize("key", ["delta", "accountant"])
def test_a_deployed_site_without_its_own_delta_or_accountant_is_a_configuration_error(cfg, tmp_path, rows, key):
    node_config = _deployed(tmp_path, rows, **{key: None})
    loose = replace(cfg, delta=0.5)

    with pytest.raises(SiteConfigError, match=f"must set {key!r}"):
        client_app.train(_message(loose, 1), _deployed_context(loose, node_config))

    assert not (tmp_path / "hospital-a" / "privacy_ledger.jsonl").exists()


def test_a_deployed_site_accounts_at_its_own_delta_whatever_the_run_config_says(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows, delta=1e-6)
    smaller = replace(cfg, delta=1e-9, accountant="rdp")  # passes the policy (not looser), but is not the site's

    reply = client_app.train(_message(smaller, 1), _deployed_context(smaller, node_config))

    assert _declined(reply) is None, _declined(reply)
    (entry,) = SiteLedger(tmp_path / "hospital-a" / "privacy_ledger.jsonl", site_id="hospital-a").entries()
    assert (entry.delta, entry.accountant) == (1e-6, "prv")
    assert entry.epsilon == pytest.approx(compose_epsilon([_event(reply)], delta=1e-6, accountant="prv"))


# -- item 4: the budget belongs to the site's data source --------------------------------------------------------


def _budget_for_one_round(cfg, event: DpEvent) -> float:
    one, two = (compose_epsilon([event] * n, delta=cfg.delta, accountant=cfg.accountant) for n in (1, 2))
    return (one + two) / 2


def test_permuted_labels_in_the_run_config_do_not_start_a_fresh_budget(cfg):
    first = client_app.train(_message(cfg, 1), _sim_context(cfg))
    write_site_settings(
        cfg.simulation_dir(RUN_ID) / "sites" / "site-0", {"max-epsilon": _budget_for_one_round(cfg, _event(first))}
    )
    permuted = replace(cfg, labels="fresh,rotten")

    reply = client_app.train(_message(permuted, 1, run_id=RUN_ID + 1), _sim_context(permuted, run_id=RUN_ID + 1))

    assert _over_budget(reply), _declined(reply)
    assert len(SiteLedger(_sim_site(cfg).ledger_path, site_id="site-0").entries()) == 1


@pytest.mark.parametrize("change", ["one added row", "one edited character"])
def test_changed_data_under_the_same_source_composes_with_its_history(cfg, tmp_path, rows, change):
    node_config = _deployed(tmp_path, rows, **{"max-epsilon": 1000.0})
    first = client_app.train(_message(cfg, 1), _deployed_context(cfg, node_config))
    assert _declined(first) is None, _declined(first)
    budget = _budget_for_one_round(cfg, _event(first))
    edited = [*rows, ("a brand new review of a film", "fresh")] if change == "one added row" else list(rows)
    if change == "one edited character":
        edited[0] = (edited[0][0] + "!", edited[0][1])
    node_config = _deployed(tmp_path, edited, **{"max-epsilon": budget})

    reply = client_app.train(_message(cfg, 1, run_id=RUN_ID + 1), _deployed_context(cfg, node_config, RUN_ID + 1))

    assert _over_budget(reply), _declined(reply)


def test_a_run_config_with_other_labels_is_refused_by_a_deployed_site(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows)
    permuted = replace(cfg, labels="fresh,rotten")

    reply = client_app.train(_message(permuted, 1), _deployed_context(permuted, node_config))

    assert "run config labels='fresh,rotten' differs from this site's labels='rotten,fresh'" in (_declined(reply) or "")


def test_a_deployed_site_reads_its_data_with_its_own_columns(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows)
    other_columns = replace(cfg, text_column="text", label_column="label")  # the server's own file's columns

    reply = client_app.train(_message(other_columns, 1), _deployed_context(other_columns, node_config))

    assert _declined(reply) is None
    (entry,) = SiteLedger(tmp_path / "hospital-a" / "privacy_ledger.jsonl", site_id="hospital-a").entries()
    assert entry.data_source == "default"


# -- item 7: nothing that leaves the site identifies its data ----------------------------------------------------


def test_the_attestation_carries_no_plain_fingerprint_and_no_row_count(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows)

    reply = client_app.train(_message(cfg, 1), _deployed_context(cfg, node_config))

    attested = json.loads(reply.content[C.ATTESTATION_RECORD]["entry"])
    labelled = [(t, ["rotten", "fresh"].index(label)) for t, label in rows]
    plain = fingerprint_rows(labelled)
    assert plain.split(":")[1] not in json.dumps(attested)
    assert "rows" not in json.dumps(attested)  # no row count anywhere in what leaves the site
    key_file = tmp_path / "hospital-a" / "fingerprint.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    h = hmac.new(key_file.read_bytes(), digestmod=hashlib.sha256)
    for text, label in labelled:
        h.update(json.dumps([text, label], ensure_ascii=True).encode() + b"\n")
    assert attested["dataset_fingerprint"] == f"hmac-sha256:{h.hexdigest()}"


def test_the_fingerprint_key_is_created_once_and_kept(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows)
    client_app.train(_message(cfg, 1), _deployed_context(cfg, node_config))
    key = (tmp_path / "hospital-a" / "fingerprint.key").read_bytes()

    client_app.train(_message(cfg, 2), _deployed_context(cfg, node_config))

    entries = SiteLedger(tmp_path / "hospital-a" / "privacy_ledger.jsonl", site_id="hospital-a").entries()
    assert (tmp_path / "hospital-a" / "fingerprint.key").read_bytes() == key
    assert entries[0].dataset_fingerprint == entries[1].dataset_fingerprint
    assert not math.isnan(entries[1].epsilon)


# -- item 8: evaluation is the site's decision, noised and ledgered -----------------------------------------------


def _evaluate_message(cfg, server_round):
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.EVALUATE_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round}),
        }
    )
    return Message(content, dst_node_id=7, message_type="evaluate")


def test_a_deployed_site_answers_no_evaluate_request_by_default(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows)

    reply = client_app.evaluate(_evaluate_message(cfg, 1), _deployed_context(cfg, node_config))

    assert "does not set allow-evaluate = true" in (_declined(reply) or "")
    assert C.METRICS_RECORD not in reply.content.metric_records
    assert not (tmp_path / "hospital-a" / "privacy_ledger.jsonl").exists()


def test_a_deployed_site_that_opts_in_releases_noisy_counts_charged_to_its_source(cfg, tmp_path, rows):
    node_config = _deployed(tmp_path, rows, **{"allow-evaluate": True, "evaluate-noise-multiplier": 8.0})
    client_app.train(_message(cfg, 1), _deployed_context(cfg, node_config))

    reply = client_app.evaluate(_evaluate_message(cfg, 1), _deployed_context(cfg, node_config))

    metrics = reply.content.metric_records[C.METRICS_RECORD]
    assert "loss" not in metrics and len(metrics["confusion-matrix"]) == 4
    entries = SiteLedger(tmp_path / "hospital-a" / "privacy_ledger.jsonl", site_id="hospital-a").entries()
    assert [(e.release, e.data_source) for e in entries] == [("train", "default"), ("evaluate", "default")]
    assert json.loads(reply.content[C.ATTESTATION_RECORD]["entry"])["purpose"] == "evaluate"
    assert entries[1].epsilon == pytest.approx(
        compose_epsilon([entries[0].event, entries[1].event], delta=1e-5, accountant="prv"), rel=1e-6
    )


def test_the_noise_is_calibrated_at_the_sites_delta_not_the_run_configs(tiny_config, tmp_path):
    cfg = replace(tiny_config, num_server_rounds=1, center_features=False, delta=1e-3, sim_dir=str(tmp_path / "sim"))
    provision_simulation(cfg.simulation_dir(RUN_ID), 3)
    write_site_settings(cfg.simulation_dir(RUN_ID) / "sites" / "site-0", {"delta": 1e-7, "accountant": "prv"})

    reply = client_app.train(_message(cfg, 1), _sim_context(cfg))

    epsilon = reply.content.metric_records[C.METRICS_RECORD][C.METRIC_EPSILON]
    assert epsilon == pytest.approx(compose_epsilon([_event(reply)], delta=1e-7, accountant="prv"), rel=1e-6)
    assert cfg.target_epsilon * 0.98 <= epsilon <= cfg.target_epsilon  # the run's target, at the site's delta
