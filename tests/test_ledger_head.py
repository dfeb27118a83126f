"""Item 5 of issue 10: a site ledger cut back, or deleted, must not hand the site a fresh budget.

Each attack runs against the real code: the site's train handler (``client.app``), the ledger the site reopens
and its budget decision, and ``privatune audit`` on the site's ledger alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from client.budget import decide
from shared import constants as C
from shared.audit.cli import audit_main
from shared.identity import Roster, provision_simulation
from shared.ledger import LedgerError, SiteLedger, fingerprint_rows
from shared.model import build_model, get_trainable
from shared.privacy import DpEvent
from shared.records import record_from_arrays
from shared.site import site_from_node_config

DELTA = 1e-5
EVENT = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)
FP = fingerprint_rows([("a fine film", 1), ("a dull film", 0)])
RUN_ID = 5150


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _append(ledger: SiteLedger, server_round: int, run_id: str = "run-a") -> object:
    return ledger.append(
        run_id=run_id,
        server_round=server_round,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=DELTA,
        accountant="rdp",
    )


def _ledger_with(path: Path, key: Ed25519PrivateKey, rounds: int) -> SiteLedger:
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    for server_round in range(1, rounds + 1):
        _append(ledger, server_round)
    return ledger


def _keep_lines(path: Path, n: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))


# -- the attacks: cut the tail, delete the file ---------------------------------------------------------------


def test_a_ledger_cut_back_to_fewer_entries_is_refused_on_reopen(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    full = _ledger_with(path, key, 3)
    budget = full.spent(FP, delta=DELTA, accountant="rdp")  # the site's budget is exactly what it spent
    assert not decide(full.history(FP), EVENT, max_epsilon=budget, delta=DELTA, accountant="rdp").accept
    _keep_lines(path, 1)  # a valid, shorter chain: every remaining line still verifies

    with pytest.raises(LedgerError, match=r"holds 1 entries, but its signed head record says 3 entries: .*removed"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_a_deleted_ledger_is_refused_on_reopen(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 3)
    path.unlink()

    with pytest.raises(LedgerError, match=r"ledger .* is missing, but its signed head record says 3 entries"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def _context(cfg, **node_config) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 3, **node_config},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _train_message(cfg, server_round: int) -> Message:
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: str(RUN_ID)}),
        }
    )
    return Message(content, dst_node_id=100, message_type="train")


@pytest.fixture()
def cfg(tiny_config):
    cfg = replace(tiny_config, num_server_rounds=3, local_steps=2)
    provision_simulation(cfg.simulation_dir(RUN_ID), 3)
    return cfg


@pytest.mark.parametrize("attack", ["cut the tail", "delete the file"])
def test_the_train_handler_refuses_to_train_after_its_ledger_lost_entries(cfg, attack):
    first = client_app.app(_train_message(cfg, 1), _context(cfg))
    spent = first.content.metric_records[C.METRICS_RECORD][C.METRIC_EPSILON]
    context = _context(cfg)  # the budget: one round, and no more
    (cfg.simulation_dir(RUN_ID) / "sites" / "site-0" / "site.toml").write_text(f"max-epsilon = {spent * 1.01}\n")
    declined = client_app.app(_train_message(cfg, 2), context)
    assert "declined" in declined.content.config_records[C.DECLINE_RECORD]["reason"]
    site = site_from_node_config({"partition-id": 0, "num-partitions": 3}, sim_dir=cfg.simulation_dir(RUN_ID))
    if attack == "cut the tail":
        site.ledger_path.write_text("")
    else:
        site.ledger_path.unlink()

    with pytest.raises(LedgerError, match="signed head record says 1 entries"):
        client_app.app(_train_message(cfg, 2), _context(cfg))


def test_the_audit_of_a_site_ledger_alone_fails_when_its_tail_was_cut(tmp_path, key, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 3)
    (tmp_path / "roster.json").write_text(Roster({"site-0": key.public_key()}).to_json())
    _keep_lines(path, 2)

    status = audit_main(
        ["--ledger", str(path), "--site-id", "site-0", "--roster", str(tmp_path / "roster.json")]
        + ["--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    assert status == 1
    assert "site-0 ledger [rollback]: the ledger holds 2 entries, but its signed head record says 3 entries" in (
        capsys.readouterr().err
    )
