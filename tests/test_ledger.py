"""The site ledger: append-only, hash-chained, signed; every bad file is an error naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.hashchain import canonical_json, record_hash
from shared.ledger import (
    LedgerError,
    SiteLedger,
    cumulative_epsilon,
    digest_array,
    fingerprint_bytes,
    fingerprint_file,
    fingerprint_rows,
    keyed_fingerprint_rows,
    load_fingerprint_key,
    verify_attestation,
)
from shared.privacy import DpEvent, PrivacyError, coalesce, compose_epsilon

DELTA = 1e-5
EVENT = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)
FINGERPRINT_KEY = bytes(range(32))
FP = keyed_fingerprint_rows([("a fine film", 1), ("a dull film", 0)], key=FINGERPRINT_KEY)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _append(ledger: SiteLedger, run_id: str = "run-a", server_round: int = 1, **kw) -> object:
    args = dict(
        run_id=run_id,
        server_round=server_round,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=DELTA,
        accountant="rdp",
    )
    args.update(kw)
    return ledger.append(**args)


def _ledger_with(tmp_path: Path, key: Ed25519PrivateKey, n: int, site_id: str = "site-0") -> Path:
    path = tmp_path / "ledger.jsonl"
    ledger = SiteLedger(path, site_id=site_id, signing_key=key)
    for r in range(1, n + 1):
        _append(ledger, server_round=r)
    return path


def _rewrite_line(path: Path, index: int, change) -> None:
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[index])
    change(record)
    lines[index] = canonical_json(record) + "\n"
    path.write_text("".join(lines))


# -- normal use


def test_entries_survive_reopen_with_the_public_key_only(tmp_path, key):
    path = _ledger_with(tmp_path, key, 3)

    reopened = SiteLedger(path, site_id="site-0", public_key=key.public_key())

    assert [e.round for e in reopened.entries()] == [1, 2, 3]
    assert [e.seq for e in reopened.entries()] == [0, 1, 2]


def test_each_entry_chains_to_the_previous_one(tmp_path, key):
    entries = SiteLedger(_ledger_with(tmp_path, key, 3), site_id="site-0").entries()

    assert entries[1].prev_hash == entries[0].entry_hash
    assert entries[2].prev_hash == entries[1].entry_hash


def test_recorded_epsilon_is_the_composition_of_the_history(tmp_path, key):
    entries = SiteLedger(_ledger_with(tmp_path, key, 3), site_id="site-0").entries()

    assert entries[2].epsilon == pytest.approx(compose_epsilon([EVENT] * 3, delta=DELTA, accountant="rdp"))
    assert entries[0].epsilon < entries[1].epsilon < entries[2].epsilon


def test_epsilon_composes_across_runs_for_the_same_data_set(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger, run_id="run-a", server_round=1)

    second = _append(ledger, run_id="run-b", server_round=1)

    assert second.epsilon == pytest.approx(compose_epsilon([EVENT, EVENT], delta=DELTA, accountant="rdp"))
    assert ledger.spent("default", delta=DELTA, accountant="rdp") == pytest.approx(second.epsilon)


def test_changed_rows_under_the_same_data_source_compose_with_its_history(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger)
    changed = keyed_fingerprint_rows([("a fine film!", 1), ("a dull film", 0)], key=FINGERPRINT_KEY)

    entry = _append(ledger, run_id="run-b", dataset_fingerprint=changed)

    assert entry.epsilon == pytest.approx(compose_epsilon([EVENT, EVENT], delta=DELTA, accountant="rdp"))


def test_another_data_source_has_its_own_history(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger)

    entry = _append(ledger, run_id="run-b", data_source="registry")

    assert ledger.history("registry") == [EVENT] and entry.data_source == "registry"
    assert entry.epsilon == pytest.approx(compose_epsilon([EVENT], delta=DELTA, accountant="rdp"))


def test_an_unkeyed_fingerprint_is_refused(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)

    with pytest.raises(LedgerError, match="dataset_fingerprint must be keyed"):
        _append(ledger, dataset_fingerprint=fingerprint_rows([("a", 1)]))
    assert ledger.entries() == []


def test_a_round_holds_one_entry_per_purpose(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger, server_round=1)

    evaluation = _append(ledger, server_round=1, purpose="evaluate")

    assert ledger.find(run_id="run-a", server_round=1, purpose="evaluate") == evaluation
    with pytest.raises(LedgerError, match="the evaluate release of round 1 of run 'run-a' is already recorded"):
        _append(ledger, server_round=1, purpose="evaluate")
    with pytest.raises(LedgerError, match="purpose must be one of"):
        _append(ledger, server_round=2, purpose="peek")


def _legacy_record(key, *, seq, prev_hash, server_round, fingerprint, epsilon):
    """A line as the ledger wrote it before data sources, purposes and keyed fingerprints."""
    from shared.hashchain import seal

    body = {
        "seq": seq,
        "run_id": "run-old",
        "round": server_round,
        "time": "2026-01-01T00:00:00.000Z",
        "site_id": "site-0",
        "adapter_hash": "sha256:00",
        "dataset_fingerprint": fingerprint,
        "event": EVENT.to_dict(),
        "delta": DELTA,
        "accountant": "rdp",
        "epsilon": epsilon,
        "max_epsilon": None,
        "seeded_noise": False,
    }
    return seal(body, kind="privatune.site-ledger.v1", prev_hash=prev_hash, signing_key=key)


def write_legacy_ledger(path: Path, key: Ed25519PrivateKey, rounds=(0, 1), *, adopt: bool = True) -> Path:
    """A ledger in the format written before data sources and keyed fingerprints; ``adopt``: anchored once by
    its operator (``python -m shared.ledger_head adopt``), as every ledger from before head records must be."""
    from shared.hashchain import genesis_hash
    from shared.ledger_head import adopt_head

    prev, lines = genesis_hash("privatune.site-ledger.v1", "site-0"), []
    plain = fingerprint_rows([("a fine film", 1), ("a dull film", 0)])
    for seq, server_round in enumerate(rounds):
        eps = compose_epsilon([EVENT] * (seq + 1), delta=DELTA, accountant="rdp")
        record = _legacy_record(key, seq=seq, prev_hash=prev, server_round=server_round, fingerprint=plain, epsilon=eps)
        lines.append(canonical_json(record) + "\n")
        prev = record["entry_hash"]
    path.write_text("".join(lines))
    if adopt:
        adopt_head(path, site_id="site-0", signing_key=key)
    return path


def test_a_legacy_ledger_is_refused_until_its_operator_adopts_it(tmp_path, key):
    path = write_legacy_ledger(tmp_path / "l.jsonl", key, adopt=False)

    with pytest.raises(LedgerError, match="has no head record.*python -m shared.ledger_head adopt"):
        SiteLedger(path, site_id="site-0", signing_key=key)


def test_an_adopted_legacy_ledger_opens_and_its_entries_count_toward_every_source(tmp_path, key):
    path = write_legacy_ledger(tmp_path / "l.jsonl", key)
    before = path.read_bytes()
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)

    assert [(e.release, e.data_source) for e in ledger.entries()] == [("feature-mean", None), ("train", None)]
    entry = _append(ledger, run_id="run-new", data_source="registry")

    assert entry.epsilon == pytest.approx(compose_epsilon([EVENT] * 3, delta=DELTA, accountant="rdp"))
    assert path.read_bytes().startswith(before)  # never rewritten


def test_a_recorded_round_is_never_counted_twice(tmp_path, key):
    path = _ledger_with(tmp_path, key, 2)
    before = path.read_bytes()
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)

    with pytest.raises(LedgerError, match="round 2 of run 'run-a' is already recorded"):
        _append(ledger, server_round=2, dataset_fingerprint=keyed_fingerprint_rows([("x", 0)], key=FINGERPRINT_KEY))
    assert path.read_bytes() == before
    assert ledger.find(run_id="run-a", server_round=2) == ledger.entries()[1]


def test_two_writers_on_one_file_keep_one_chain(tmp_path, key):
    path = tmp_path / "l.jsonl"
    first = SiteLedger(path, site_id="site-0", signing_key=key)
    second = SiteLedger(path, site_id="site-0", signing_key=key)
    _append(first, server_round=1)

    entry = _append(second, server_round=2)

    assert entry.seq == 1
    assert entry.epsilon == pytest.approx(compose_epsilon([EVENT] * 2, delta=DELTA, accountant="rdp"))
    assert len(SiteLedger(path, site_id="site-0", public_key=key.public_key()).entries()) == 2


def test_every_line_is_one_strict_json_object_ending_in_newline(tmp_path, key):
    path = _ledger_with(tmp_path, key, 2)

    data = path.read_bytes()

    assert data.endswith(b"\n") and data.count(b"\n") == 2
    assert all(json.loads(line)["site_id"] == "site-0" for line in data.splitlines())


def test_a_round_without_noise_records_infinite_epsilon_as_strict_json(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    no_noise = DpEvent(sample_rate=0.05, noise_multiplier=0.0, steps=5, clip_norm=1.0)

    entry = _append(ledger, event=no_noise)

    assert entry.epsilon == float("inf")
    assert '"epsilon":"inf"' in (tmp_path / "l.jsonl").read_text()
    assert SiteLedger(tmp_path / "l.jsonl", site_id="site-0").entries()[0].epsilon == float("inf")


def test_the_budget_in_force_is_recorded_with_the_entry(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger, max_epsilon=3.0)
    _append(ledger, server_round=2, max_epsilon=float("inf"))

    entries = SiteLedger(tmp_path / "l.jsonl", site_id="site-0").entries()

    assert [e.max_epsilon for e in entries] == [3.0, float("inf")]


def test_seeded_noise_is_recorded_with_the_entry(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    _append(ledger)
    _append(ledger, server_round=2, seeded_noise=True)

    entries = SiteLedger(tmp_path / "l.jsonl", site_id="site-0").entries()

    assert [e.seeded_noise for e in entries] == [False, True]


def test_a_non_positive_budget_is_not_recorded(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)

    with pytest.raises(LedgerError, match=r"max_epsilon must be > 0 \(inf for no budget\) or None, got 0.0"):
        _append(ledger, max_epsilon=0.0)
    assert not (tmp_path / "l.jsonl").exists()


# -- attestations


def test_attestation_verifies_under_the_site_key(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    entry = _append(ledger)

    attested = verify_attestation(ledger.attestation(entry), key.public_key())

    assert attested == entry


def test_attestation_is_flat_for_a_config_record(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)

    att = ledger.attestation(_append(ledger))

    assert all(isinstance(v, (str, int, float)) for v in att.values())


def test_attestation_under_a_wrong_key_is_rejected(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    att = ledger.attestation(_append(ledger))

    with pytest.raises(LedgerError, match="signature does not verify"):
        verify_attestation(att, Ed25519PrivateKey.generate().public_key())


def test_attestation_with_an_edited_epsilon_is_rejected(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    att = ledger.attestation(_append(ledger))

    with pytest.raises(LedgerError, match="field 'epsilon' is 0.01 but the signed entry says"):
        verify_attestation({**att, "epsilon": 0.01}, key.public_key())


def test_attestation_with_an_edited_entry_is_rejected(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)
    att = ledger.attestation(_append(ledger))
    entry = json.loads(att["entry"])
    entry["epsilon"] = 0.01

    with pytest.raises(LedgerError, match="entry_hash does not match the attested entry"):
        verify_attestation({**att, "entry": canonical_json(entry), "epsilon": 0.01}, key.public_key())


# -- bad files: each an error naming the line, and the file left as it was


def test_truncated_last_line_is_reported_and_not_repaired(tmp_path, key):
    path = _ledger_with(tmp_path, key, 2)
    with open(path, "ab") as f:  # a crash in the middle of the third write
        f.write(b'{"accountant":"rdp","adapter_hash":"sha256:00","data')
    before = path.read_bytes()

    with pytest.raises(LedgerError, match=r"line 3 is truncated \(\d+ bytes without a newline\)"):
        SiteLedger(path, site_id="site-0", signing_key=key)
    assert path.read_bytes() == before


def test_a_crash_in_the_middle_of_a_write_leaves_a_detectably_truncated_line(tmp_path, key, monkeypatch):
    import shared.hashchain

    path = _ledger_with(tmp_path, key, 1)
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)
    real_write = shared.hashchain.os.write

    def dying_write(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError("power lost")  # the process dies after half of the line reached the disk

    monkeypatch.setattr(shared.hashchain.os, "write", dying_write)
    with pytest.raises(OSError, match="power lost"):
        _append(ledger, server_round=2)
    monkeypatch.undo()

    with pytest.raises(LedgerError, match=r"line 2 is truncated"):
        SiteLedger(path, site_id="site-0", signing_key=key)
    assert len(path.read_bytes().splitlines()) == 2  # the half line is still there: never repaired


def test_complete_last_line_that_is_not_json_is_reported(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1)
    with open(path, "ab") as f:
        f.write(b"{not json\n")

    with pytest.raises(LedgerError, match="line 2 is not a valid JSON record"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_edited_entry_is_reported_as_tampered(tmp_path, key):
    path = _ledger_with(tmp_path, key, 3)
    _rewrite_line(path, 1, lambda r: r.update(epsilon=0.001))

    with pytest.raises(LedgerError, match="line 2: entry_hash does not match the entry's content"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_edited_and_rehashed_entry_fails_its_signature(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1)

    def forge(record):
        record["epsilon"] = 0.001
        record["entry_hash"] = record_hash(record)

    _rewrite_line(path, 0, forge)

    with pytest.raises(LedgerError, match="line 1: signature does not verify"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_ledger_signed_by_another_key_is_rejected(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1)
    wrong = Ed25519PrivateKey.generate()

    with pytest.raises(LedgerError, match="line 1: signature does not verify under the site's public key"):
        SiteLedger(path, site_id="site-0", public_key=wrong.public_key())


def test_signing_key_that_does_not_match_the_public_key_is_rejected(tmp_path, key):
    wrong = Ed25519PrivateKey.generate()

    with pytest.raises(LedgerError, match="the signing key does not match the public key"):
        SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=wrong, public_key=key.public_key())


def test_swapped_lines_are_reported_as_reordered(tmp_path, key):
    path = _ledger_with(tmp_path, key, 3)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2] + lines[1])

    with pytest.raises(LedgerError, match="line 2: seq 2 where seq 1 was expected: entry 1 is missing"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_a_removed_middle_line_is_reported_as_a_gap(tmp_path, key):
    path = _ledger_with(tmp_path, key, 3)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])

    with pytest.raises(LedgerError, match="line 2: seq 2 where seq 1 was expected"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_a_removed_first_line_is_reported(tmp_path, key):
    path = _ledger_with(tmp_path, key, 2)
    path.write_text(path.read_text().splitlines(keepends=True)[1])

    with pytest.raises(LedgerError, match="line 1: seq 1 where seq 0 was expected: entry 0 is missing"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_another_sites_ledger_is_rejected_as_foreign(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1, site_id="site-1")

    with pytest.raises(LedgerError, match="line 1: site_id is 'site-1', this ledger belongs to 'site-0'"):
        SiteLedger(path, site_id="site-0", public_key=key.public_key())


def test_a_ledger_renamed_to_another_site_fails_its_genesis(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1, site_id="site-1")

    def rename(record):
        record["site_id"] = "site-0"
        record["entry_hash"] = record_hash(record)

    _rewrite_line(path, 0, rename)

    with pytest.raises(LedgerError, match="wrong genesis"):
        SiteLedger(path, site_id="site-0")


def test_appending_without_the_signing_key_is_refused(tmp_path, key):
    path = _ledger_with(tmp_path, key, 1)
    ledger = SiteLedger(path, site_id="site-0", public_key=key.public_key())

    with pytest.raises(LedgerError, match="opened without a signing key"):
        _append(ledger, server_round=2)


@pytest.mark.parametrize("delta", [0.0, 1.0, 1.5, -1e-5])
def test_delta_outside_0_1_is_refused_and_nothing_written(tmp_path, key, delta):
    path = _ledger_with(tmp_path, key, 1)
    before = path.read_bytes()
    ledger = SiteLedger(path, site_id="site-0", signing_key=key)

    with pytest.raises(PrivacyError, match=rf"delta must be in \(0, 1\), got {delta}"):
        _append(ledger, server_round=2, delta=delta)
    assert path.read_bytes() == before


def test_an_unknown_accountant_is_refused(tmp_path, key):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=key)

    with pytest.raises(PrivacyError, match="accountant must be one of"):
        _append(ledger, accountant="gdp")


# -- fingerprints and digests


def test_keyed_fingerprint_has_no_row_count_and_depends_on_the_key():
    rows = [("a fine film", 1), ("a dull film", 0)]

    fp = keyed_fingerprint_rows(rows, key=FINGERPRINT_KEY)

    assert fp.startswith("hmac-sha256:") and "rows" not in fp and "film" not in fp
    assert fingerprint_rows(rows).split(":")[1] not in fp
    assert keyed_fingerprint_rows(rows, key=bytes(32)) != fp
    assert keyed_fingerprint_rows([*rows[:1], ("a dull film", 1)], key=FINGERPRINT_KEY) != fp


def test_the_fingerprint_key_is_made_once_with_mode_0600(tmp_path):
    import stat

    key = load_fingerprint_key(tmp_path / "site" / "fingerprint.key")

    assert len(key) == 32 and load_fingerprint_key(tmp_path / "site" / "fingerprint.key") == key
    assert stat.S_IMODE((tmp_path / "site" / "fingerprint.key").stat().st_mode) == 0o600


def test_a_readable_or_short_fingerprint_key_is_refused(tmp_path):
    path = tmp_path / "fingerprint.key"
    load_fingerprint_key(path)
    path.chmod(0o644)
    with pytest.raises(LedgerError, match="must be readable by its owner only"):
        load_fingerprint_key(path)
    path.write_bytes(b"short")
    with pytest.raises(LedgerError, match="must hold 32 bytes, has 5"):
        load_fingerprint_key(path)


def test_legacy_fingerprint_has_hash_and_row_count_and_no_content():
    fp = fingerprint_rows([("a fine film", 1), ("a dull film", 0)])

    assert fp.startswith("sha256:") and fp.endswith(":rows=2")
    assert "film" not in fp


def test_fingerprint_changes_with_one_label():
    assert fingerprint_rows([("a", 1), ("b", 0)]) != fingerprint_rows([("a", 1), ("b", 1)])


def test_fingerprint_of_a_file_hashes_its_bytes(tmp_path):
    data = b"text,label\nok,1\n"
    (tmp_path / "d.csv").write_bytes(data)

    assert fingerprint_file(tmp_path / "d.csv", rows=1) == fingerprint_bytes(data, rows=1)


@pytest.mark.parametrize("bad", [(), ("b", 1.5), ("b", True), ("b", None)], ids=["empty", "float", "bool", "none"])
def test_fingerprint_rejects_a_row_that_is_not_text_and_integer_fields(bad):
    with pytest.raises(LedgerError, match="row 1 must be a non-empty tuple of text"):
        fingerprint_rows([("a", 1), bad])


def test_a_prompt_response_row_fingerprints_apart_from_a_text_label_row():
    key = bytes(32)
    assert keyed_fingerprint_rows([("a", "b")], key=key) != keyed_fingerprint_rows([("a", 0)], key=key)
    assert keyed_fingerprint_rows([("a", "b")], key=key) != keyed_fingerprint_rows([("ab",)], key=key)


def test_digest_depends_on_dtype():
    assert digest_array(np.zeros(3, np.float32)) != digest_array(np.zeros(3, np.float64))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_coalesced_events_give_the_epsilon_of_the_round_by_round_history(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    other = DpEvent(sample_rate=0.1, noise_multiplier=0.9, steps=5, clip_norm=1.0)
    events = [EVENT, other, EVENT, EVENT]
    opacus = PRVAccountant() if accountant == "prv" else RDPAccountant()
    opacus.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]  # one entry per round
    kwargs = {"eps_error": 1e-3} if accountant == "prv" else {}

    assert len(coalesce(events)) == 2
    assert cumulative_epsilon(events, delta=DELTA, accountant=accountant) == pytest.approx(
        opacus.get_epsilon(delta=DELTA, **kwargs), rel=1e-4
    )
