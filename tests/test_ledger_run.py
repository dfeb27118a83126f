"""The server's per-run ledger: hash-chained like the site ledger, holding verified site attestations."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.run_ledger import RunLedger
from shared.identity import Roster
from shared.ledger import LedgerError, SiteLedger, keyed_fingerprint_rows
from shared.privacy import DpEvent

EVENT = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {"site-0": Ed25519PrivateKey.generate(), "site-1": Ed25519PrivateKey.generate()}


@pytest.fixture
def roster(keys) -> Roster:
    return Roster({k: v.public_key() for k, v in keys.items()})


def _attestation(tmp_path, keys, site_id="site-0", run_id="run-a", server_round=1) -> dict:
    ledger = SiteLedger(tmp_path / f"{site_id}.jsonl", site_id=site_id, signing_key=keys[site_id])
    entry = ledger.append(
        run_id=run_id,
        server_round=server_round,
        adapter_hash="sha256:00",
        dataset_fingerprint=keyed_fingerprint_rows([(site_id, 0)], key=bytes(32)),
        event=EVENT,
        delta=1e-5,
        accountant="rdp",
    )
    return ledger.attestation(entry)


def _record(run: RunLedger, server_round: int, attestations: dict, **kw):
    args = dict(
        participants=["site-0", "site-1"],
        declined={"site-1": "declined: budget already spent"},
        survivors=["site-0"],
        dropped=[],
        aborted=False,
        aggregate_hash="sha256:aa",
        attestations=attestations,
        metrics={"accuracy": 0.7, "loss": 0.5},
    )
    args.update(kw)
    return run.record_round(server_round, **args)


def test_recorded_rounds_survive_reopen(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)
    _record(run, 1, {"site-0": _attestation(tmp_path, keys)})

    reopened = RunLedger(tmp_path / "run_ledger.jsonl", "run-a")

    assert reopened.rounds() == [1]
    assert reopened.records()[0]["declined"] == {"site-1": "declined: budget already spent"}


def test_a_classifiers_per_label_recall_is_recorded_with_the_rounds_metrics(tmp_path, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)
    per_class = {
        "rotten": {"rows": 342, "found": 77, "recall": 77 / 342},
        "fresh": {"rows": 468, "found": 468, "recall": 1.0},
    }
    _record(run, 1, {}, metrics={"accuracy": 0.67, "loss": 0.6, "per_class": per_class})

    assert RunLedger(tmp_path / "run_ledger.jsonl", "run-a").records()[0]["metrics"]["per_class"] == per_class


def test_an_attestation_in_the_run_ledger_still_verifies(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)
    _record(run, 1, {"site-0": _attestation(tmp_path, keys)})

    stored = RunLedger(tmp_path / "run_ledger.jsonl", "run-a").records()[0]["attestations"]["site-0"]

    assert run.verify_attestation(stored).round == 1


def test_a_round_is_recorded_once(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)
    _record(run, 1, {})

    with pytest.raises(LedgerError, match="round 1 of run 'run-a' is already recorded"):
        _record(run, 1, {})


def test_attestation_signed_by_the_wrong_key_writes_nothing(tmp_path, keys):
    wrong = Roster({"site-0": keys["site-1"].public_key(), "site-1": keys["site-1"].public_key()})
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=wrong)

    with pytest.raises(LedgerError, match="signature does not verify under the site's roster key"):
        _record(run, 1, {"site-0": _attestation(tmp_path, keys)})
    assert not (tmp_path / "run_ledger.jsonl").exists()


def test_attestation_from_another_run_is_rejected(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)

    with pytest.raises(LedgerError, match="is for run 'run-b', not 'run-a'"):
        _record(run, 1, {"site-0": _attestation(tmp_path, keys, run_id="run-b")})


def test_attestation_for_another_round_is_rejected(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)

    with pytest.raises(LedgerError, match="round 2: attestation from 'site-0' is for round 1"):
        _record(run, 2, {"site-0": _attestation(tmp_path, keys)})


def test_attestation_from_a_site_not_in_the_roster_is_rejected(tmp_path, keys):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=Roster({"site-1": keys["site-1"].public_key()}))

    with pytest.raises(LedgerError, match="site 'site-0' is not in the roster"):
        _record(run, 1, {"site-0": _attestation(tmp_path, keys)})


def test_attestation_filed_under_another_site_is_rejected(tmp_path, keys, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)

    with pytest.raises(LedgerError, match="attestation filed under 'site-1' is from 'site-0'"):
        _record(run, 1, {"site-1": _attestation(tmp_path, keys)})


def test_survivor_that_did_not_participate_is_rejected(tmp_path, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)

    with pytest.raises(LedgerError, match=r"survivors \['site-9'\] are not participants"):
        _record(run, 1, {}, survivors=["site-0", "site-9"])


def test_missing_aggregate_hash_is_rejected_unless_aborted(tmp_path, roster):
    run = RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster)

    with pytest.raises(LedgerError, match="aggregate_hash is required unless the round was aborted"):
        _record(run, 1, {}, aggregate_hash=None)
    assert _record(run, 1, {}, aggregate_hash=None, aborted=True)["aborted"] is True


def test_run_ledger_of_another_run_is_rejected(tmp_path, roster):
    _record(RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster), 1, {})

    with pytest.raises(LedgerError, match="run_id is 'run-a', this ledger belongs to 'run-b'"):
        RunLedger(tmp_path / "run_ledger.jsonl", "run-b")


def test_edited_run_ledger_is_rejected(tmp_path, roster):
    path = tmp_path / "run_ledger.jsonl"
    _record(RunLedger(path, "run-a", roster=roster), 1, {})
    record = json.loads(path.read_text())
    record["declined"] = {}
    path.write_text(json.dumps(record) + "\n")

    with pytest.raises(LedgerError, match="line 1: entry_hash does not match"):
        RunLedger(path, "run-a")


def test_the_run_ledger_is_created_owner_only_whatever_the_umask(tmp_path, roster):
    old = os.umask(0)
    try:
        _record(RunLedger(tmp_path / "run_ledger.jsonl", "run-a", roster=roster), 1, {})
    finally:
        os.umask(old)

    assert stat.S_IMODE((tmp_path / "run_ledger.jsonl").stat().st_mode) == 0o600
