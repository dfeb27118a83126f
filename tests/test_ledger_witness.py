"""Item 3 of issue 21 (second point): a ledger and its head restored together from an older backup, or both
deleted, must not hand a site a fresh budget.

The head record catches a ledger cut back on its own (tests/test_ledger_head.py); a ledger and its head taken
back together are consistent with each other. Each attack here runs through the site's real train handler.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from shared import constants as C
from shared.audit.cli import audit_main
from shared.cli import main as cli_main
from shared.config import BUILTIN_DATA
from shared.identity import IDENTITY_KEY_FILE, Roster, load_private_key, write_private_key
from shared.ledger import LedgerError, SiteLedger, keyed_fingerprint_rows
from shared.ledger_witness import read_witness
from shared.model import build_model, get_trainable
from shared.privacy import DpEvent, compose_epsilon
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


@pytest.mark.slow  # trains through the site's handler
def test_a_ledger_and_its_head_restored_from_an_older_backup_are_refused(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in _ledger_files(tmp_path):  # both files, consistent with each other, one round behind
        shutil.copy2(tmp_path / "backup" / path.name, path)

    with pytest.raises(LedgerError, match=r"holds 1 entries, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)

    assert len(SiteLedger(_ledger_files(tmp_path)[0], site_id=SITE).entries()) == 1  # nothing trained or written


@pytest.mark.slow  # trains through the site's handler
def test_a_ledger_deleted_with_its_head_is_refused(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in _ledger_files(tmp_path):
        path.unlink()

    with pytest.raises(LedgerError, match=r"is missing, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)


@pytest.mark.slow  # trains through the site's handler
def test_a_site_directory_restored_whole_is_refused_by_a_witness_on_other_storage(cfg, tmp_path):
    witness = tmp_path / "other-disk" / "hospital-a.witness.json"
    witness.parent.mkdir()
    node_config = _two_rounds_spending_the_budget(
        cfg, tmp_path, tmp_path / "backup", **{"ledger-witness": str(witness)}
    )
    shutil.rmtree(tmp_path / SITE)
    shutil.copytree(tmp_path / "backup", tmp_path / SITE)  # keys, ledger, head: all as they were after round 1

    with pytest.raises(LedgerError, match=r"holds 1 entries, but its witness .* says 2 entries"):
        _train(cfg, node_config, 3)


@pytest.mark.slow  # trains through the site's handler
def test_a_ledger_deleted_with_its_head_and_witness_is_refused_while_the_fingerprint_key_remains(cfg, tmp_path):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in tmp_path.joinpath(SITE).glob("privacy_ledger*"):
        path.unlink()
    for path in tmp_path.joinpath(SITE).glob("*witness*"):
        path.unlink()

    with pytest.raises(LedgerError, match=r"fingerprint key .* but no ledger"):
        _train(cfg, node_config, 3)


# -- the operator's override: recorded in the ledger, shown by the audit ------------------------------------------


def _write_node_config(node_config: dict) -> Path:
    path = Path(node_config["site-dir"]) / "node-config.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in node_config.items()))
    return path


@pytest.mark.slow  # trains through the site's handler
def test_the_operators_override_is_recorded_in_the_ledger_and_failed_by_the_audit(cfg, tmp_path, capsys):
    node_config = _two_rounds_spending_the_budget(cfg, tmp_path, tmp_path / "backup")
    for path in _ledger_files(tmp_path):
        shutil.copy2(tmp_path / "backup" / path.name, path)
    _write_node_config(node_config)
    site_dir = str(tmp_path / SITE)

    status = cli_main(["site", "accept-ledger", site_dir, "--reason", "disk failed; Monday's backup", "--yes"])

    out = capsys.readouterr().out
    assert status == 0, out
    assert "says 2 entries" in out and "recorded as entry 1" in out and "at least 1 release(s) lost" in out
    ledger = SiteLedger(_ledger_files(tmp_path)[0], site_id=SITE)
    (override,) = ledger.overrides()
    assert (override.seq, override.entries_found, override.witness["count"], override.head["count"]) == (1, 1, 2, 1)
    assert override.reason == "disk failed; Monday's backup" and "witness" in override.problem
    assert _declined(_train(cfg, node_config, 3)) is None  # the site releases again: the operator decided so
    key = load_private_key(tmp_path / SITE / IDENTITY_KEY_FILE)
    (tmp_path / "roster.json").write_text(Roster({SITE: key.public_key()}).to_json())
    audit = audit_main(
        ["--ledger", str(_ledger_files(tmp_path)[0]), "--site-id", SITE, "--roster", str(tmp_path / "roster.json")]
        + ["--out", str(tmp_path / "audit"), "--no-cross-check"]
    )
    err = capsys.readouterr().err
    assert audit == 1
    assert "ERROR hospital-a ledger line 2 [override]: entry 1: the site's operator went on from this ledger" in err
    assert "its witness said 2" in err and 'reason: "disk failed; Monday\'s backup"' in err
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    (site,) = report["sites"]
    assert [(o["seq"], o["lost_at_least"]) for o in site["overrides"]] == [(1, 1)]
    assert [e["seq"] for e in site["entries"]] == [0, 2]  # the releases: round 1, and the one after the override


@pytest.mark.slow  # trains through the site's handler
def test_accept_ledger_refuses_when_there_is_nothing_to_accept(cfg, tmp_path, capsys):
    node_config = _node_config(tmp_path)
    assert _declined(_train(cfg, node_config, 1)) is None
    _write_node_config(node_config)

    status = cli_main(["site", "accept-ledger", str(tmp_path / SITE), "--reason", "just because", "--yes"])

    assert status == 1 and "nothing to accept" in capsys.readouterr().out
    assert SiteLedger(_ledger_files(tmp_path)[0], site_id=SITE).overrides() == []


# -- the witness itself ------------------------------------------------------------------------------------------

EVENT = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)
FP = keyed_fingerprint_rows([("a fine film", 1), ("a dull film", 0)], key=bytes(range(32)))


def _open(path: Path, key: Ed25519PrivateKey, witness: Path) -> SiteLedger:
    return SiteLedger(path, site_id="site-0", signing_key=key, witness_path=witness)


def _append(ledger: SiteLedger, server_round: int) -> None:
    ledger.append(
        run_id="run-a",
        server_round=server_round,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=DELTA,
        accountant="rdp",
    )


@pytest.fixture()
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_witness_one_entry_behind_is_the_crash_window_and_is_advanced(tmp_path, key):
    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    ledger = _open(path, key, witness)
    _append(ledger, 1)
    before = witness.read_bytes()
    _append(ledger, 2)
    witness.write_bytes(before)  # a crash after the head write, before the witness write

    _open(path, key, witness)

    assert read_witness(witness, site_id="site-0", public_key=key.public_key()).count == 2


def test_a_witness_replaced_by_an_older_copy_is_refused(tmp_path, key):
    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    ledger = _open(path, key, witness)
    _append(ledger, 1)
    before = witness.read_bytes()
    _append(ledger, 2)
    _append(ledger, 3)
    witness.write_bytes(before)

    with pytest.raises(LedgerError, match=r"holds 3 entries, but its witness .* names only 1: .*older copy"):
        _open(path, key, witness)


def test_a_ledger_replaced_by_another_history_of_the_same_length_is_refused(tmp_path, key):
    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    _append(_open(path, key, witness), 1)
    kept = witness.read_bytes()
    path.unlink()
    path.with_name("privacy_ledger.head.json").unlink()
    witness.unlink()
    _append(_open(path, key, witness), 7)  # another history, with its own head and witness
    witness.write_bytes(kept)

    with pytest.raises(LedgerError, match=r"entry 0 of the ledger .* is not the one its witness .* names"):
        _open(path, key, witness)


def test_an_edited_witness_fails_its_signature(tmp_path, key):
    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    ledger = _open(path, key, witness)
    _append(ledger, 1)
    _append(ledger, 2)
    witness.write_text(witness.read_text().replace('"count":2', '"count":1'))

    with pytest.raises(LedgerError, match="signature does not verify"):
        _open(path, key, witness)


def test_a_ledger_from_before_witnesses_gets_one_written_from_its_entries(tmp_path, key, caplog):
    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    old = SiteLedger(path, site_id="site-0", signing_key=key)  # no witness yet
    _append(old, 1)
    _append(old, 2)

    _open(path, key, witness)

    assert read_witness(witness, site_id="site-0", public_key=key.public_key()).count == 2
    assert "no ledger witness at" in caplog.text and "written from the ledger's 2 entries" in caplog.text


def test_a_witness_on_storage_that_is_not_mounted_is_an_error_not_a_new_local_directory(tmp_path, key):
    witness = tmp_path / "not-mounted" / "w.json"

    with pytest.raises(LedgerError, match=r"directory of the ledger witness .* does not exist \(is its storage"):
        _open(tmp_path / "privacy_ledger.jsonl", key, witness)

    assert not witness.parent.exists()


def test_the_site_check_before_start_refuses_a_ledger_deleted_with_its_head(tmp_path):
    from shared.app_approval import approve_app, review_app
    from shared.enrolment import approve_roster, init_site, review_roster
    from shared.provision import ProvisionError, check_bundle, provision
    from tests.conftest import write_app

    site = init_site(SITE, tmp_path / SITE)  # as `privatune site init`, then the coordinator's bundle, approved
    fed = provision(tmp_path / "fed", [site.request_path], superlink_hosts=["link.example.org"])
    review = review_roster(site.site_dir, fed.bundle_dirs[SITE])
    approve_roster(review, confirmed=review.others)  # the only site: no one else to confirm or countersign
    approve_app(review_app(site.site_dir, write_app(tmp_path / "app" / "tinyapp")))  # and the app (site start)
    (site.site_dir / "data.csv").write_text('text,label\n"good film",fresh\n')
    key = load_private_key(site.site_dir / IDENTITY_KEY_FILE)
    ledger = SiteLedger(
        site.site_dir / "privacy_ledger.jsonl",
        site_id=SITE,
        signing_key=key,
        witness_path=site.site_dir / "ledger-witness.json",
    )
    _append(ledger, 1)
    assert check_bundle(site.site_dir) == site.site_dir
    for path in site.site_dir.glob("privacy_ledger*"):
        path.unlink()

    with pytest.raises(ProvisionError, match=r"would refuse every release: the ledger .* is missing, but its witness"):
        check_bundle(site.site_dir)


def test_an_attested_release_that_an_override_let_go_of_fails_the_audit_with_the_run_ledger(tmp_path, key, capsys):
    from server.run_ledger import RunLedger
    from shared.ledger import RUN_LEDGER_FILE
    from shared.ledger_override import accept_ledger

    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    ledger = _open(path, key, witness)
    roster = Roster({"site-0": key.public_key()})
    (tmp_path / "roster.json").write_text(roster.to_json())
    run = RunLedger(tmp_path / "run" / RUN_LEDGER_FILE, "run-a", roster=roster)
    for server_round in (1, 2):
        _append(ledger, server_round)
        run.record_round(
            server_round,
            participants=["site-0"],
            declined=[],
            survivors=["site-0"],
            dropped=[],
            aborted=False,
            aggregate_hash="sha256:00",
            attestations={"site-0": ledger.attestation(ledger.entries()[-1])},
            metrics={},
        )
        if server_round == 1:
            backup = {p: p.read_bytes() for p in (path, path.with_name("privacy_ledger.head.json"))}
    for p, data in backup.items():
        p.write_bytes(data)
    accept_ledger(path, site_id="site-0", signing_key=key, reason="lost disk", witness_path=witness)

    status = audit_main(
        ["--ledger", str(path), "--site-id", "site-0", "--roster", str(tmp_path / "roster.json")]
        + ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    err = capsys.readouterr().err
    assert status == 1
    assert "[override]: entry 1: the site's operator went on from this ledger" in err
    assert (
        "[rollback]: the server holds site-0's signed entry 1 (run run-a, round 2, epsilon" in err
        and "but line 2 of its ledger is its operator's override" in err
    )


def test_an_override_never_accepts_a_ledger_whose_chain_was_edited(tmp_path, key):
    from shared.ledger_override import accept_ledger

    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    ledger = _open(path, key, witness)
    _append(ledger, 1)
    _append(ledger, 2)
    path.write_text(path.read_text().replace('"round":2', '"round":3'))

    with pytest.raises(LedgerError, match="does not verify, and is never accepted"):
        accept_ledger(path, site_id="site-0", signing_key=key, reason="it looks fine", witness_path=witness)


def test_an_override_without_a_reason_is_refused(tmp_path, key):
    from shared.ledger_override import accept_ledger

    path, witness = tmp_path / "privacy_ledger.jsonl", tmp_path / "w.json"
    _append(_open(path, key, witness), 1)
    path.unlink()

    with pytest.raises(LedgerError, match="reason must say why the ledger is accepted as it is .*got '  '"):
        accept_ledger(path, site_id="site-0", signing_key=key, reason="  ", witness_path=witness)

    assert not path.exists()
