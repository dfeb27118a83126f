"""Item 5 of issue 10: a site ledger cut back, or deleted, must not hand the site a fresh budget.

Each attack runs against the real code: the site's train handler (``client.app``), the ledger the site reopens
and its budget decision, and ``privatune audit`` on the site's ledger alone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from client.budget import decide
from shared import constants as C
from shared import hashchain, ledger_head
from shared.audit.cli import audit_main
from shared.hashchain import ChainError, canonical_json
from shared.identity import Roster, provision_simulation
from shared.ledger import LedgerError, SiteLedger, keyed_fingerprint_rows
from shared.ledger_head import HeadError, adopt_head, default_head_path, read_head, write_head
from shared.model import build_model, get_trainable
from shared.privacy import DpEvent
from shared.records import record_from_arrays
from shared.site import site_from_node_config

DELTA = 1e-5
EVENT = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)
FP = keyed_fingerprint_rows([("a fine film", 1), ("a dull film", 0)], key=bytes(range(32)))
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
    budget = full.spent("default", delta=DELTA, accountant="rdp")  # the site's budget is exactly what it spent
    assert not decide(full.history("default"), EVENT, max_epsilon=budget, delta=DELTA, accountant="rdp").accept
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


def test_a_ledger_and_head_restored_together_from_an_older_copy_fail_the_audit_with_the_run_ledgers(
    tmp_path, key, capsys
):
    from server.run_ledger import RunLedger
    from shared.ledger import RUN_LEDGER_FILE

    path = tmp_path / "sites" / "privacy_ledger.jsonl"
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    roster = Roster({"site-0": key.public_key()})
    (tmp_path / "roster.json").write_text(roster.to_json())
    run = RunLedger(tmp_path / "run" / RUN_LEDGER_FILE, "run-a", roster=roster)
    backup = {}
    for server_round in (1, 2, 3):
        entry = _append(ledger, server_round)
        run.record_round(
            server_round,
            participants=["site-0"],
            declined=[],
            survivors=["site-0"],
            dropped=[],
            aborted=False,
            aggregate_hash="sha256:00",
            attestations={"site-0": ledger.attestation(entry)},
            metrics={},
        )
        if server_round == 1:  # the site's backup after round 1: ledger and head, consistent with each other
            backup = {p: p.read_bytes() for p in (path, default_head_path(path))}
    for p, data in backup.items():
        p.write_bytes(data)
    assert len(SiteLedger(path, site_id="site-0", signing_key=key).entries()) == 1  # the head alone cannot tell

    status = audit_main(
        ["--ledger", str(path), "--site-id", "site-0", "--roster", str(tmp_path / "roster.json")]
        + ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    assert status == 1
    assert "site-0 ledger [rollback]: the server holds site-0's signed entry 1 (run run-a, round 2)" in (
        capsys.readouterr().err
    )


def test_a_deleted_ledger_whose_entries_the_run_ledger_attests_is_an_error(tmp_path, key, capsys):
    from server.run_ledger import RunLedger
    from shared.ledger import RUN_LEDGER_FILE

    path = tmp_path / "sites" / "privacy_ledger.jsonl"
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    roster = Roster({"site-0": key.public_key()})
    (tmp_path / "roster.json").write_text(roster.to_json())
    run = RunLedger(tmp_path / "run" / RUN_LEDGER_FILE, "run-a", roster=roster)
    for server_round in (1, 2):
        entry = _append(ledger, server_round)
        run.record_round(
            server_round,
            participants=["site-0"],
            declined=[],
            survivors=["site-0"],
            dropped=[],
            aborted=False,
            aggregate_hash="sha256:00",
            attestations={"site-0": ledger.attestation(entry)},
            metrics={},
        )
    path.unlink()
    default_head_path(path).unlink()  # both gone: the site itself would start over

    status = audit_main(
        ["--ledger", str(path), "--site-id", "site-0", "--roster", str(tmp_path / "roster.json")]
        + ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    assert status == 1
    assert (
        f"ERROR site-0 ledger [missing]: the ledger {path} is missing, but run run-a holds 2 signed entries of it "
        "(entries 0, 1): the ledger was deleted"
    ) in capsys.readouterr().err


# -- the head record ------------------------------------------------------------------------------------------


def _audit_alone(tmp_path: Path, key: Ed25519PrivateKey, path: Path, *extra: str) -> int:
    (tmp_path / "roster.json").write_text(Roster({"site-0": key.public_key()}).to_json())
    return audit_main(
        ["--ledger", str(path), "--site-id", "site-0", "--roster", str(tmp_path / "roster.json")]
        + ["--out", str(tmp_path / "out"), "--no-cross-check", *extra]
    )


def test_the_audit_of_a_deleted_ledger_whose_head_remains_fails(tmp_path, key, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 2)
    path.unlink()

    assert _audit_alone(tmp_path, key, path) == 1
    assert f"ERROR site-0 ledger [missing]: the ledger {path} is missing, but its signed head record says 2" in (
        capsys.readouterr().err
    )


def test_the_audit_of_a_ledger_whose_head_was_deleted_fails(tmp_path, key, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 2)
    default_head_path(path).unlink()

    assert _audit_alone(tmp_path, key, path) == 1
    assert "ERROR site-0 ledger [head-missing]: the ledger" in capsys.readouterr().err


def test_no_ledger_and_no_head_is_a_new_empty_ledger_anchored_from_its_first_entry(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    assert ledger.entries() == [] and not path.exists() and not default_head_path(path).exists()

    entry = _append(ledger, 1)

    head = read_head(default_head_path(path), site_id="site-0", public_key=key.public_key())
    assert head is not None and (head.count, head.head_hash, head.adopted_count) == (1, entry.entry_hash, None)


def test_the_head_follows_every_append(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"

    ledger = _ledger_with(path, key, 3)

    head = read_head(default_head_path(path), site_id="site-0", public_key=key.public_key())
    assert head is not None and (head.count, head.head_hash) == (3, ledger.entries()[-1].entry_hash)


def test_two_writers_keep_the_head_in_step(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    first = SiteLedger(path, site_id="site-0", signing_key=key)
    second = SiteLedger(path, site_id="site-0", signing_key=key)
    _append(first, 1)

    _append(second, 2)
    _append(first, 3)

    assert len(SiteLedger(path, site_id="site-0", public_key=key.public_key()).entries()) == 3


def test_opening_while_another_writer_appends_is_not_mistaken_for_a_cut(tmp_path, key, monkeypatch):
    path = tmp_path / "privacy_ledger.jsonl"
    writer = _ledger_with(path, key, 1)
    real_read = ledger_head.LedgerAnchor._read
    reader_anchors: list = []

    def read_after_a_concurrent_append(anchor):  # the reader has read 1 entry; the writer appends entry 2 now
        if anchor is not writer._anchor and not reader_anchors:
            reader_anchors.append(anchor)
            _append(writer, 2)
        return real_read(anchor)

    monkeypatch.setattr(ledger_head.LedgerAnchor, "_read", read_after_a_concurrent_append)

    reader = SiteLedger(path, site_id="site-0", signing_key=key)

    assert [e.round for e in reader.entries()] == [1, 2]


def test_a_deleted_head_is_an_error_not_a_new_anchor(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 2)
    default_head_path(path).unlink()

    with pytest.raises(LedgerError, match=r"holds 2 entries but has no head record at .* never re-anchored"):
        SiteLedger(path, site_id="site-0", signing_key=key)
    assert not default_head_path(path).exists()  # and nothing was written


def test_an_emptied_ledger_is_refused(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 2)
    path.write_bytes(b"")

    with pytest.raises(LedgerError, match="holds 0 entries, but its signed head record says 2 entries"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_a_ledger_replaced_by_another_history_of_the_same_length_is_a_fork(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 2)
    head = default_head_path(path).read_bytes()
    path.unlink()
    default_head_path(path).unlink()
    other = SiteLedger(path, site_id="site-0", signing_key=key)
    _append(other, 1, run_id="run-b")
    _append(other, 2, run_id="run-b")
    default_head_path(path).write_bytes(head)  # the head of the first history

    with pytest.raises(LedgerError, match="entry 1 of the ledger is not the one its signed head record anchors"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_an_edited_head_fails_its_signature(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 3)
    _keep_lines(path, 1)
    head_path = default_head_path(path)
    record = json.loads(head_path.read_text())
    record["count"] = 1
    head_path.write_text(json.dumps(record))

    with pytest.raises(LedgerError, match="signature does not verify under the site's key"):
        SiteLedger(path, site_id="site-0", signing_key=key)
    assert _audit_alone(tmp_path, key, path) == 1


def test_an_unsigned_head_of_a_signed_ledger_is_refused(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 1)
    head_path = default_head_path(path)
    head_path.write_text(json.dumps({**json.loads(head_path.read_text()), "signature": None}))

    with pytest.raises(LedgerError, match="signature does not verify"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_a_head_signed_by_another_key_is_refused(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _ledger_with(path, key, 2)
    write_head(
        default_head_path(path),
        site_id="site-0",
        records=[e.to_record() for e in ledger.entries()[:1]],
        adopted_count=None,
        signing_key=Ed25519PrivateKey.generate(),
    )

    with pytest.raises(LedgerError, match="signature does not verify"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_another_sites_head_is_refused(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 1)
    other = tmp_path / "other" / "privacy_ledger.jsonl"
    ledger = SiteLedger(other, site_id="site-1", signing_key=key)
    _append(ledger, 1)
    shutil.copyfile(default_head_path(other), default_head_path(path))

    with pytest.raises(LedgerError, match=r"head record .* belongs to 'site-1', not 'site-0'"):
        SiteLedger(path, site_id="site-0", signing_key=key)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"kind": "x"}', "missing fields"),
    ],
)
def test_a_malformed_head_is_an_error_naming_it(tmp_path, key, content, message):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 1)
    default_head_path(path).write_bytes(content)

    with pytest.raises(LedgerError, match=message):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_the_head_can_live_elsewhere(tmp_path, key):
    path = tmp_path / "ledger" / "privacy_ledger.jsonl"
    head_path = tmp_path / "worm" / "site-0.head.json"
    ledger = SiteLedger(path, site_id="site-0", signing_key=key, head_path=head_path)
    _append(ledger, 1)
    _append(ledger, 2)
    assert head_path.exists() and not default_head_path(path).exists()
    _keep_lines(path, 1)

    with pytest.raises(LedgerError, match="holds 1 entries, but its signed head record says 2 entries"):
        SiteLedger(path, site_id="site-0", signing_key=key, head_path=head_path)
    assert _audit_alone(tmp_path, key, path, "--ledger-head", f"site-0={head_path}") == 1


def test_a_deployed_site_sets_its_head_path_in_its_node_config(tmp_path):
    from client.site_policy import check_node_config

    node_config = {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": str(tmp_path / "data.csv"),
        "delta": 1e-5,
        "accountant": "prv",
        "labels": "neg,pos",
        "ledger-head-path": str(tmp_path / "elsewhere" / "head.json"),
    }
    check_node_config(node_config)

    site = site_from_node_config(node_config, sim_dir=tmp_path)

    assert site.ledger_head_path == tmp_path / "elsewhere" / "head.json"
    assert site_from_node_config({"partition-id": 0}, sim_dir=tmp_path).ledger_head_path is None  # beside it


# -- a crash between the ledger's append and the head's write -------------------------------------------------


def _crash_on_head_write(monkeypatch) -> None:
    def crash(path, data):
        raise OSError("simulated crash before the head record was written")

    monkeypatch.setattr(ledger_head, "write_atomic", crash)


def test_a_crash_before_the_head_write_leaves_one_entry_that_the_next_open_anchors(tmp_path, key, monkeypatch, caplog):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _ledger_with(path, key, 2)
    with monkeypatch.context() as m:
        _crash_on_head_write(m)
        with pytest.raises(OSError, match="simulated crash"):
            _append(ledger, 3)
    assert len(path.read_text().splitlines()) == 3  # the entry is on disk, the head still says 2
    assert read_head(default_head_path(path), site_id="site-0", public_key=key.public_key()).count == 2

    reopened = SiteLedger(path, site_id="site-0", signing_key=key)

    assert len(reopened.entries()) == 3
    assert read_head(default_head_path(path), site_id="site-0", public_key=key.public_key()).count == 3
    assert "its chain and signature verify, so the head now anchors it" in caplog.text
    _keep_lines(path, 2)  # from now on, removing that entry is caught
    with pytest.raises(LedgerError, match="holds 2 entries, but its signed head record says 3 entries"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_a_reader_accepts_one_unanchored_entry_without_writing(tmp_path, key, monkeypatch, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _ledger_with(path, key, 1)
    with monkeypatch.context() as m:
        _crash_on_head_write(m)
        with pytest.raises(OSError):
            _append(ledger, 2)
    head_before = default_head_path(path).read_bytes()

    reader = SiteLedger(path, site_id="site-0", public_key=key.public_key())

    assert len(reader.entries()) == 2 and default_head_path(path).read_bytes() == head_before
    assert _audit_alone(tmp_path, key, path) == 0
    assert "WARNING site-0 ledger line 2 [head-lag]" in capsys.readouterr().err


def test_an_unanchored_entry_whose_signature_fails_is_not_anchored(tmp_path, key, monkeypatch):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _ledger_with(path, key, 1)
    with monkeypatch.context() as m:
        _crash_on_head_write(m)
        with pytest.raises(OSError):
            _append(ledger, 2)
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["signature"] = Ed25519PrivateKey.generate().sign(b"x").hex()
    path.write_text(lines[0] + canonical_json(record) + "\n")
    head_before = default_head_path(path).read_bytes()

    with pytest.raises(LedgerError, match="signature does not verify"):
        SiteLedger(path, site_id="site-0", signing_key=key)
    assert default_head_path(path).read_bytes() == head_before


def test_a_head_two_entries_behind_is_an_error(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _ledger_with(path, key, 1)
    old_head = default_head_path(path).read_bytes()
    _append(ledger, 2)
    _append(ledger, 3)
    default_head_path(path).write_bytes(old_head)  # an older head put back

    with pytest.raises(LedgerError, match="anchors only 1: a crash leaves at most one entry unanchored"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_the_head_is_replaced_atomically_or_not_at_all(tmp_path, monkeypatch):
    head_path = tmp_path / "privacy_ledger.head.json"
    hashchain.write_atomic(head_path, b"old head\n")

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)  # the new content is written but never made durable
    with pytest.raises(OSError, match="disk gone"):
        hashchain.write_atomic(head_path, b"new head\n")

    assert head_path.read_bytes() == b"old head\n"  # the old head, whole
    assert [p.name for p in tmp_path.iterdir()] == ["privacy_ledger.head.json"]  # no temporary file left


# -- adopting a ledger written before head records ------------------------------------------------------------


def _pre_head_ledger(path: Path, key: Ed25519PrivateKey, rounds: int) -> None:
    """A ledger as PrivaTune wrote it before head records: the same chain, no head file."""
    _ledger_with(path, key, rounds)
    default_head_path(path).unlink()


def test_a_ledger_without_a_head_is_adopted_only_on_purpose_and_says_so(tmp_path, key, caplog):
    path = tmp_path / "privacy_ledger.jsonl"
    _pre_head_ledger(path, key, 2)
    before = path.read_bytes()

    head = adopt_head(path, site_id="site-0", signing_key=key)

    assert (head.count, head.adopted_count) == (2, 2) and path.read_bytes() == before  # nothing rewritten
    assert "ADOPTED the ledger" in caplog.text
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    _append(ledger, 3)
    later = read_head(default_head_path(path), site_id="site-0", public_key=key.public_key())
    assert (later.count, later.adopted_count) == (3, 2)  # every later head still says so


def test_the_audit_warns_that_adopted_entries_were_never_anchored(tmp_path, key, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    _pre_head_ledger(path, key, 2)
    adopt_head(path, site_id="site-0", signing_key=key)

    assert _audit_alone(tmp_path, key, path) == 0
    assert "WARNING site-0 ledger [adopted]: the first 2 entries were written before head records" in (
        capsys.readouterr().err
    )


def test_an_existing_head_is_never_replaced_by_adoption(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _ledger_with(path, key, 3)
    _keep_lines(path, 1)
    head_before = default_head_path(path).read_bytes()

    with pytest.raises(HeadError, match="already exists: a head record is never replaced"):
        adopt_head(path, site_id="site-0", signing_key=key)
    assert default_head_path(path).read_bytes() == head_before


def test_adoption_verifies_the_whole_chain_under_the_sites_key(tmp_path, key):
    path = tmp_path / "privacy_ledger.jsonl"
    _pre_head_ledger(path, key, 2)

    with pytest.raises(ChainError, match="signature does not verify"):
        adopt_head(path, site_id="site-0", signing_key=Ed25519PrivateKey.generate())
    assert not default_head_path(path).exists()


def test_the_adopt_command_anchors_a_pre_head_ledger(tmp_path, key, capsys):
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "privacy_ledger.jsonl"
    _pre_head_ledger(path, key, 2)
    key_path = tmp_path / "identity_ed25519.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    args = ["adopt", "--ledger", str(path), "--site-id", "site-0", "--identity-key", str(key_path)]

    assert ledger_head.main(args) == 0
    assert "adopted 2 entries" in capsys.readouterr().out
    assert ledger_head.main(args) == 1  # a second time: the head exists
    assert "already exists" in capsys.readouterr().err


# -- file modes -----------------------------------------------------------------------------------------------


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive umask: the files must still be 0600
    yield
    os.umask(old)


def test_the_ledger_and_its_head_are_created_owner_only(tmp_path, key, open_umask):
    path = tmp_path / "privacy_ledger.jsonl"

    _ledger_with(path, key, 2)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(default_head_path(path).stat().st_mode) == 0o600
