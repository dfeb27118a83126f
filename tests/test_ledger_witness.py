"""Item 3 of issue 21 (second point): a ledger and its head restored together from an older backup, or both
deleted, must not hand a site a fresh budget.

The head record catches a ledger cut back on its own (tests/test_ledger_head.py); a ledger and its head taken
back together are consistent with each other. Each attack here runs through the site's real train handler.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from shared import constants as C
from shared.config import BUILTIN_DATA
from shared.identity import IDENTITY_KEY_FILE, write_private_key
from shared.ledger import LedgerError, SiteLedger
from shared.model import build_model, get_trainable
from shared.privacy import compose_epsilon
from shared.records import record_from_arrays
from tests.conftest import make_rows

SITE = "hospital-a"
DELTA = 1e-5


@pytest.fixture()
def cfg(tiny_config):
    """Fixed noise (no calibration), no centering round, one local step: one cheap DP event per round. A
    deployed site's run config names no data path or sim dir of its own."""
    return replace(
        tiny_config,
        noise_multiplier=1.0,
        target_epsilon=0.0,
        center_features=False,
        local_steps=1,
        data_path=BUILTIN_DATA,
        sim_dir="",
    )


def _node_config(tmp_path: Path, **node) -> dict:
    site_dir = tmp_path / SITE
    if not (site_dir / IDENTITY_KEY_FILE).exists():
        write_private_key(site_dir / IDENTITY_KEY_FILE, Ed25519PrivateKey.generate())
        (site_dir / "notes.csv").write_text(
            "text,label\n" + "".join(f'"{t}",{label}\n' for t, label in make_rows(32, seed=5))
        )
    return {
        "site-id": SITE,
        "site-dir": str(site_dir),
        "data-path": str(site_dir / "notes.csv"),
        "max-epsilon": 1000.0,
        "delta": DELTA,
        "accountant": "prv",
        "labels": "rotten,fresh",
        **node,
    }


def _train(cfg, node_config: dict, server_round: int, run_id: int = 1) -> Message:
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: str(run_id)}),
        }
    )
    context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())
    return client_app.train(Message(content, dst_node_id=7, message_type="train"), context)


def _declined(reply: Message) -> str | None:
    record = reply.content.config_records.get(C.DECLINE_RECORD)
    return None if record is None else str(record["reason"])


def _ledger_files(tmp_path: Path) -> list[Path]:
    ledger = tmp_path / SITE / "privacy_ledger.jsonl"
    return [ledger, ledger.with_name("privacy_ledger.head.json")]


def _two_rounds_spending_the_budget(cfg, tmp_path: Path, backup: Path, **node) -> dict:
    """Round 1, a backup of ``backup`` (a copy of the site's ledger files, or its whole directory), then round 2;
    the site's budget is then spent: a third round is over it."""
    assert _declined(_train(cfg, _node_config(tmp_path, **node), 1)) is None
    (entry,) = SiteLedger(_ledger_files(tmp_path)[0], site_id=SITE).entries()
    two, three = (compose_epsilon([entry.event] * n, delta=DELTA, accountant="prv") for n in (2, 3))
    node_config = _node_config(tmp_path, **{"max-epsilon": (two + three) / 2, **node})
    shutil.copytree(tmp_path / SITE, backup)
    assert _declined(_train(cfg, node_config, 2)) is None
    assert "declined" in (_declined(_train(cfg, node_config, 3)) or "")
    return node_config


def test_a_ledger_and_its_head_restored_from_an_older_backup_are_refused(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in _ledger_files(tmp_path):  # both files, consistent with each other, one round behind
        shutil.copy2(tmp_path / "backup" / path.name, path)

    with pytest.raises(LedgerError, match=r"holds 1 entries, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)

    assert len(SiteLedger(_ledger_files(tmp_path)[0], site_id=SITE).entries()) == 1  # nothing trained or written


def test_a_ledger_deleted_with_its_head_is_refused(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in _ledger_files(tmp_path):
        path.unlink()

    with pytest.raises(LedgerError, match=r"is missing, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)


def test_a_site_directory_restored_whole_is_refused_by_a_witness_on_other_storage(cfg, tmp_path):
    witness = tmp_path / "other-disk" / "hospital-a.witness.json"
    node_config = _two_rounds_spending_the_budget(
        cfg, tmp_path, tmp_path / "backup", **{"ledger-witness": str(witness)}
    )
    shutil.rmtree(tmp_path / SITE)
    shutil.copytree(tmp_path / "backup", tmp_path / SITE)  # keys, ledger, head: all as they were after round 1

    with pytest.raises(LedgerError, match=r"holds 1 entries, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)


def test_a_ledger_deleted_with_its_head_and_witness_is_refused_while_the_fingerprint_key_remains(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in tmp_path.joinpath(SITE).glob("privacy_ledger*"):
        path.unlink()
    for path in tmp_path.joinpath(SITE).glob("*witness*"):
        path.unlink()

    with pytest.raises(LedgerError, match=r"fingerprint key .* but no ledger"):
        _train(cfg, node_config, 3)
