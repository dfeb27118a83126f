"""A site's own privacy ledger: one signed, hash-chained JSON line per release of the site's data.

The ledger lives on the site's disk so that the site never has to trust the server's account of its privacy.
Each entry records what the release was for (``purpose``: a training round, the feature-mean query, an
evaluation), the site's data source it drew on, a keyed fingerprint of the rows (HMAC under a key only the
site holds: it tells the site's auditor that the data changed, and tells nobody else anything about the rows),
the DP event, and the site's cumulative epsilon over every entry of the same data source, in every run, at
the site's own delta. The file is only ever appended to (see :mod:`shared.hashchain`); a problem found on
open is an error naming the line, never something repaired.

Entries written before data sources existed (no ``data_source``, a plain ``sha256:<hex>:rows=<n>``
fingerprint) still open and audit unchanged; they count toward every source of the site, since the ledger
cannot tell which data they drew on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.distributed_dp import (
    GUARANTEE_AGGREGATE,
    GUARANTEES,
    AnyDpEvent,
    DiscreteGaussianDpEvent,
    Guarantees,
    compose,
    event_from_dict,
)
from shared.hashchain import ChainError, ChainWriter, canonical_json, record_hash, signature_valid
from shared.ledger_head import LedgerAnchor, default_head_path
from shared.ledger_witness import LedgerWitness
from shared.privacy import DpEvent, PrivacyError, check_accountant, check_delta

SITE_LEDGER_KIND = "privatune.site-ledger.v1"
RUN_LEDGER_KIND = "privatune.run-ledger.v1"  # the server's ledger of a run (server/run_ledger.py)
RUN_LEDGER_FILE = "run_ledger.jsonl"  # in the run's output directory
ENTRY_FIELDS = (
    "seq",
    "run_id",
    "round",
    "time",
    "site_id",
    "adapter_hash",
    "dataset_fingerprint",
    "event",
    "delta",
    "accountant",
    "epsilon",
    "prev_hash",
    "entry_hash",
    "signature",
    "max_epsilon",
    "seeded_noise",
    "data_source",
    "purpose",
    "guarantees",
)
# absent in older entries; "guarantees" only in a distributed-noise round (shared/distributed_dp.py)
OPTIONAL_FIELDS = ("max_epsilon", "seeded_noise", "data_source", "purpose", "guarantees")
PURPOSE_TRAIN = "train"  # a round of DP-SGD
PURPOSE_FEATURE_MEAN = "feature-mean"  # round 0 of a centered run: the noisy mean query
PURPOSE_EVALUATE = "evaluate"  # DP-noised evaluation counts
PURPOSES = (PURPOSE_TRAIN, PURPOSE_FEATURE_MEAN, PURPOSE_EVALUATE)
DEFAULT_DATA_SOURCE = "default"  # as shared.site.DEFAULT_DATA_SOURCE
FINGERPRINT_KEY_BYTES = 32
KEYED_FINGERPRINT_PREFIX = "hmac-sha256:"
ATTESTATION_FIELDS = (
    "site_id",
    "run_id",
    "round",
    "seq",
    "epsilon",
    "delta",
    "accountant",
    "entry_hash",
    "signature",
)


OVERRIDE_FIELDS = (
    "seq",
    "site_id",
    "time",
    "override",
    "reason",
    "problem",
    "entries_found",
    "head",
    "witness",
    "prev_hash",
    "entry_hash",
    "signature",
)
OVERRIDE_ACCEPT_LEDGER = "accept-ledger"  # the operator went on from the ledger as it was (shared/ledger_override.py)


class LedgerError(ValueError):
    """A ledger is truncated, tampered, reordered, forked, foreign, badly signed, or an append is refused."""


# -- fingerprints and digests (hashes only, never content) --------------------------------------------------


def load_fingerprint_key(path: Path) -> bytes:
    """The site's secret fingerprint key at ``path``: created once (32 random bytes, mode 0600), then read.

    Creation is atomic (a complete temporary file hard-linked into place), so two processes starting at once
    end up with the same key.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(FINGERPRINT_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != FINGERPRINT_KEY_BYTES:
        raise LedgerError(f"fingerprint key {path} must hold {FINGERPRINT_KEY_BYTES} bytes, has {len(key)}")
    if path.stat().st_mode & 0o077:
        raise LedgerError(f"fingerprint key {path} must be readable by its owner only (chmod 600 {path})")
    return key


def keyed_fingerprint_rows(rows: Iterable[Sequence[str | int]], *, key: bytes) -> str:
    """``"hmac-sha256:<hex>"`` of the rows in order, under the site's secret ``key``. A row is a tuple of its text
    and integer fields (a classifier's ``(text, label)``; a causal-LM row's ``(prompt, response)`` or ``(text,)``).

    No row count, and nothing anyone without the key can test a guess of the rows against: it may leave the
    site (the attestation carries the ledger entry). It changes with any change of the rows or their labels.
    """
    if len(key) < 16:
        raise LedgerError(f"fingerprint key must be at least 16 bytes, got {len(key)}")
    h = hmac.new(key, digestmod=hashlib.sha256)
    for row in _checked_rows(rows):
        h.update(row)
    return f"{KEYED_FINGERPRINT_PREFIX}{h.hexdigest()}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_rows(rows: Iterable[Sequence[str | int]]) -> Iterable[bytes]:
    """Each row as one JSON line: ``[text, label]`` for a classifier's row, as fingerprints always were."""
    for i, row in enumerate(rows):
        fields = tuple(row)
        if not fields or not all(isinstance(v, str) or _is_int(v) for v in fields):
            raise LedgerError(f"row {i} must be a non-empty tuple of text (str) and integer fields, got {row!r}")
        yield json.dumps([v if isinstance(v, str) else int(v) for v in fields], ensure_ascii=True).encode() + b"\n"


# The unkeyed fingerprints below are the format of ledgers written before keyed fingerprints (they let anyone
# holding all rows but one confirm the missing one, so nothing writes them into a new entry); kept to read,
# test and describe those ledgers.


def _fingerprint(digest: str, rows: int) -> str:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise LedgerError(f"rows must be a non-negative integer, got {rows!r}")
    return f"sha256:{digest}:rows={rows}"


def fingerprint_bytes(data: bytes, *, rows: int) -> str:
    """``"sha256:<hex>:rows=<n>"`` of a data file's bytes and its number of records."""
    return _fingerprint(hashlib.sha256(data).hexdigest(), rows)


def fingerprint_file(path: Path, *, rows: int) -> str:
    """:func:`fingerprint_bytes` of a file, read in chunks; ``rows``: records the loader read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return _fingerprint(h.hexdigest(), rows)


def fingerprint_rows(rows: Sequence[tuple[str, int]]) -> str:
    """The legacy unkeyed ``"sha256:<hex>:rows=<n>"`` of ``(text, label)`` rows (see the note above)."""
    h = hashlib.sha256()
    for row in _checked_rows(rows):
        h.update(row)
    return _fingerprint(h.hexdigest(), len(rows))


def digest_array(array: np.ndarray) -> str:
    """``"sha256:<hex>"`` of an array's dtype, shape and bytes (adapter weights, an update, an aggregate)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
    return f"sha256:{h.hexdigest()}"


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of named arrays (e.g. the trainable tensors by name), in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + b"\0" + digest_array(arrays[name]).encode() + b"\n")
    return f"sha256:{h.hexdigest()}"


# -- accounting ---------------------------------------------------------------------------------------------


def cumulative_epsilon(events: Iterable[AnyDpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of ``events`` at ``delta``: what the ledger records, what budgets check.

    Local DP-SGD rounds only: the site's accountant; with a distributed-noise round, RDP for all
    (:func:`shared.distributed_dp.compose`)."""
    return compose(events, delta=delta, accountant=accountant)


# -- entries ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One line of a site ledger: one round a site trained in, and its cumulative epsilon after it."""

    seq: int
    run_id: str
    round: int
    time: str
    site_id: str
    adapter_hash: str
    dataset_fingerprint: str
    event: AnyDpEvent  # the event the budget was enforced on
    delta: float
    accountant: str
    epsilon: float
    prev_hash: str
    entry_hash: str
    signature: str
    max_epsilon: float | None = None  # the site's budget when it trained this round (None: not recorded)
    seeded_noise: bool = False  # noise and sampling seeded from the run seed: epsilon not valid against the server
    data_source: str | None = None  # the site's data source the budget belongs to (None: a legacy entry)
    purpose: str | None = None  # train, feature-mean, evaluate (None: a legacy entry, see release)
    guarantees: Guarantees | None = None  # a distributed-noise round: both guarantees (None: local noise)

    def event_for(self, guarantee: str) -> AnyDpEvent:
        """The entry's event under ``guarantee`` (aggregate or fallback); a local-noise round has one event."""
        if guarantee not in GUARANTEES:
            raise LedgerError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
        if self.guarantees is None:
            return self.event
        return self.guarantees.aggregate if guarantee == GUARANTEE_AGGREGATE else self.guarantees.fallback

    @property
    def release(self) -> str:
        """What the entry released: its ``purpose``, or for a legacy entry ``train`` (``feature-mean`` in round
        0, the only round a feature-mean query was ever answered in)."""
        if self.purpose is not None:
            return self.purpose
        return PURPOSE_FEATURE_MEAN if self.round == 0 else PURPOSE_TRAIN

    def composes_with(self, data_source: str) -> bool:
        """Whether this entry's event counts toward the budget of ``data_source`` (legacy entries: every one)."""
        return self.data_source is None or self.data_source == data_source

    def to_record(self) -> dict[str, Any]:
        """The entry as the JSON object stored on its line (``inf`` spelled ``"inf"``)."""
        record = {f: getattr(self, f) for f in ENTRY_FIELDS}
        record["event"] = self.event.to_dict()
        if self.guarantees is None:
            del record["guarantees"]
        else:
            record["guarantees"] = self.guarantees.to_dict()
        return json.loads(canonical_json(record))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LedgerEntry:
        """Parse a stored record, naming the first missing or mistyped field."""
        missing = [f for f in ENTRY_FIELDS if f not in record and f not in OPTIONAL_FIELDS]
        if missing:
            raise LedgerError(f"ledger entry {record.get('seq', '?')} is missing {missing}")
        unknown = sorted(set(record) - set(ENTRY_FIELDS))
        if unknown:
            raise LedgerError(f"ledger entry {record['seq']} has unknown fields {unknown}")
        try:
            event = event_from_dict(dict(record["event"]))
            raw_guarantees = record.get("guarantees")
            guarantees = None if raw_guarantees is None else Guarantees.from_dict(dict(raw_guarantees))
            if guarantees is not None and guarantees.budgeted != event:
                raise LedgerError(f"its event is not the {guarantees.enforced} guarantee it says was enforced")
            if guarantees is None and isinstance(event, DiscreteGaussianDpEvent):
                raise LedgerError("a distributed-noise event without its two guarantees")
            entry = cls(
                seq=_typed(record, "seq", int),
                run_id=_typed(record, "run_id", str),
                round=_typed(record, "round", int),
                time=_typed(record, "time", str),
                site_id=_typed(record, "site_id", str),
                adapter_hash=_typed(record, "adapter_hash", str),
                dataset_fingerprint=_typed(record, "dataset_fingerprint", str),
                event=event,
                delta=float(record["delta"]),
                accountant=_typed(record, "accountant", str),
                epsilon=float(record["epsilon"]),
                prev_hash=_typed(record, "prev_hash", str),
                entry_hash=_typed(record, "entry_hash", str),
                signature=_typed(record, "signature", str),
                max_epsilon=None if record.get("max_epsilon") is None else float(record["max_epsilon"]),
                seeded_noise=bool(record.get("seeded_noise", False)),
                data_source=None if record.get("data_source") is None else _typed(record, "data_source", str),
                purpose=None if record.get("purpose") is None else _typed(record, "purpose", str),
                guarantees=guarantees,
            )
            if entry.purpose is not None and entry.purpose not in PURPOSES:
                raise LedgerError(f"purpose must be one of {PURPOSES}, got {entry.purpose!r}")
        except (PrivacyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger entry {record.get('seq', '?')} is malformed: {e}") from e
        return entry


def is_override(record: Mapping[str, Any]) -> bool:
    """Whether a stored ledger line is an operator's override (:class:`LedgerOverride`), not a release."""
    return "override" in record


@dataclass(frozen=True)
class LedgerOverride:
    """One line of a site ledger that records no release but an operator's decision: to go on from the ledger
    as it was found although its head record or witness said that entries were lost (``privatune site
    accept-ledger``, :mod:`shared.ledger_override`). It is chained and signed like every entry, and the audit
    reports it: releases it lets go of are in no epsilon of this ledger."""

    seq: int
    site_id: str
    time: str
    override: str  # what was decided: accept-ledger
    reason: str  # the operator's own words
    problem: str  # why the site refused the ledger, as it said it
    entries_found: int  # entries the ledger held when the operator went on from it
    head: Mapping[str, Any] | None  # the head record then ({"count", "head_hash", "time"}; None: none readable)
    witness: Mapping[str, Any] | None  # the witness then (likewise)
    prev_hash: str
    entry_hash: str
    signature: str

    @property
    def entries_said(self) -> int:
        """The most entries the head record or the witness said the ledger held."""
        counts = [int(r["count"]) for r in (self.head, self.witness) if r is not None]
        return max([self.entries_found, *counts])

    @property
    def lost(self) -> int:
        """Releases the ledger lost, as far as its head record and witness tell (a lower bound)."""
        return self.entries_said - self.entries_found

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LedgerOverride:
        """Parse a stored override line, naming the first missing or mistyped field."""
        if set(record) != set(OVERRIDE_FIELDS):
            missing, unknown = sorted(set(OVERRIDE_FIELDS) - set(record)), sorted(set(record) - set(OVERRIDE_FIELDS))
            raise LedgerError(
                f"ledger override {record.get('seq', '?')}: missing fields {missing}, unknown fields {unknown}"
            )
        for name in ("head", "witness"):
            value = record[name]
            if value is not None and not (isinstance(value, Mapping) and _is_int(value.get("count"))):
                raise LedgerError(
                    f"ledger override {record['seq']}: {name} must be null or hold a count, got {value!r}"
                )
        override = cls(
            seq=_typed(record, "seq", int),
            site_id=_typed(record, "site_id", str),
            time=_typed(record, "time", str),
            override=_typed(record, "override", str),
            reason=_typed(record, "reason", str),
            problem=_typed(record, "problem", str),
            entries_found=_typed(record, "entries_found", int),
            head=record["head"],
            witness=record["witness"],
            prev_hash=_typed(record, "prev_hash", str),
            entry_hash=_typed(record, "entry_hash", str),
            signature=_typed(record, "signature", str),
        )
        if override.override != OVERRIDE_ACCEPT_LEDGER:
            raise LedgerError(f"ledger override {override.seq}: unknown override {override.override!r}")
        return override


def _typed(record: Mapping[str, Any], key: str, typ: type) -> Any:
    value = record[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise LedgerError(f"ledger entry field {key!r} must be {typ.__name__}, got {value!r}")
    return value


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SiteLedger:
    """A site's append-only privacy ledger file. Opening it verifies the whole chain (and signatures) and that
    nothing was cut off since the last append: the ledger must match its signed head record
    (:mod:`shared.ledger_head`, at ``head_path``, by default ``<ledger>.head.json`` beside it) and, when
    ``witness_path`` is given, its witness on other storage (:mod:`shared.ledger_witness`; ``proof_of_use``, the
    site's fingerprint key, tells a deleted ledger from a new one)."""

    def __init__(
        self,
        path: Path,
        *,
        site_id: str,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
        head_path: Path | None = None,
        witness_path: Path | None = None,
        proof_of_use: Path | None = None,
    ) -> None:
        if not site_id:
            raise LedgerError("site_id must be a non-empty string")
        self.path = Path(path)
        self.site_id = site_id
        self.head_path = Path(head_path) if head_path is not None else default_head_path(self.path)
        try:
            self._chain = ChainWriter(
                self.path,
                kind=SITE_LEDGER_KIND,
                owner=site_id,
                owner_field="site_id",
                signing_key=signing_key,
                public_key=public_key,
            )
            self._anchor = LedgerAnchor(self._chain, self.head_path, signing_key=signing_key)
            self._witness = (
                None
                if witness_path is None
                else LedgerWitness(self._chain, witness_path, signing_key=signing_key, proof_of_use=proof_of_use)
            )
        except ChainError as e:
            raise LedgerError(f"site ledger of {site_id!r} is invalid: {e}") from e
        self._load(self._chain.records)

    def _load(self, records: list[dict[str, Any]]) -> None:
        self._records = {r["entry_hash"]: r for r in records}  # the stored lines, for attestations
        self._entries = [LedgerEntry.from_record(r) for r in records if not is_override(r)]
        self._overrides = [LedgerOverride.from_record(r) for r in records if is_override(r)]

    def _check_anchors(self, records: list[dict[str, Any]]) -> None:
        self._anchor.check(records)
        if self._witness is not None:
            self._witness.check(records)

    def _advance_anchors(self, records: list[dict[str, Any]]) -> None:
        self._anchor.advance(records)
        if self._witness is not None:
            self._witness.advance(records)

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        return self._chain.public_key

    def entries(self) -> list[LedgerEntry]:
        """Every release recorded, in ledger order (the operator's overrides are not releases: :meth:`overrides`)."""
        return list(self._entries)

    def overrides(self) -> list[LedgerOverride]:
        return list(self._overrides)

    def history(self, data_source: str) -> list[AnyDpEvent]:
        """The DP events of every entry of this data source (and every legacy entry), across all runs, in
        ledger order, whatever the rows' fingerprint was: a changed row does not give the same people a new
        budget."""
        return [e.event for e in self._entries if e.composes_with(data_source)]

    def history_under(self, data_source: str, guarantee: str) -> list[AnyDpEvent]:
        """:meth:`history` with every distributed-noise round taken under ``guarantee`` (aggregate or fallback)."""
        return [e.event_for(guarantee) for e in self._entries if e.composes_with(data_source)]

    def spent(self, data_source: str, *, delta: float, accountant: str) -> float:
        """Epsilon spent so far on this data source, at ``delta``, recomputed from the events."""
        return cumulative_epsilon(self.history(data_source), delta=delta, accountant=accountant)

    def find(self, *, run_id: str, server_round: int, purpose: str = PURPOSE_TRAIN) -> LedgerEntry | None:
        """The entry already recorded for this release in this round of this run, if any (retry / replay)."""
        for e in self._entries:
            if e.run_id == run_id and e.round == server_round and e.release == purpose:
                return e
        return None

    def append(
        self,
        *,
        run_id: str,
        server_round: int,
        adapter_hash: str,
        dataset_fingerprint: str,
        event: AnyDpEvent,
        delta: float,
        accountant: str,
        max_epsilon: float | None = None,
        seeded_noise: bool = False,
        data_source: str = DEFAULT_DATA_SOURCE,
        purpose: str = PURPOSE_TRAIN,
        guarantees: Guarantees | None = None,
    ) -> LedgerEntry:
        """Record one release, with the cumulative epsilon over ``data_source``'s history and ``event``.

        Refuses a release already recorded for the same run, round and ``purpose``, so a retried or resumed
        round is never counted twice (use :meth:`find` to get the existing entry back); a round may hold one
        entry of each purpose (its training and an evaluation). ``max_epsilon``, the site's budget
        when it decided to train, is recorded so that an audit can show the budget held; a round is recorded
        even over budget (it was trained: hiding it would be worse). ``seeded_noise`` marks a round whose DP
        noise and sampling were seeded from the run's seed (reproducible experiments): its epsilon does not
        hold against whoever knows that seed, and the audit says so. A distributed-noise round passes its
        ``guarantees`` (both are recorded); ``event`` must then be the one enforced.
        """
        check_delta(delta)
        check_accountant(accountant)
        if not isinstance(event, (DpEvent, DiscreteGaussianDpEvent)):
            raise LedgerError(f"event must be a DpEvent or DiscreteGaussianDpEvent, got {type(event).__name__}")
        if (guarantees is None) != isinstance(event, DpEvent) or (guarantees and guarantees.budgeted != event):
            raise LedgerError("a distributed-noise round records its two guarantees, and its event is the enforced one")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise LedgerError(f"server_round must be a non-negative integer, got {server_round!r}")
        if not run_id:
            raise LedgerError("run_id must be a non-empty string")
        if max_epsilon is not None and not max_epsilon > 0:
            raise LedgerError(f"max_epsilon must be > 0 (inf for no budget) or None, got {max_epsilon}")
        if not isinstance(data_source, str) or not data_source:
            raise LedgerError(f"data_source must be a non-empty string, got {data_source!r}")
        if purpose not in PURPOSES:
            raise LedgerError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
        if not str(dataset_fingerprint).startswith(KEYED_FINGERPRINT_PREFIX):
            raise LedgerError(
                f"dataset_fingerprint must be keyed ({KEYED_FINGERPRINT_PREFIX}..., see keyed_fingerprint_rows), got "
                f"{str(dataset_fingerprint)[:24]!r}: an unkeyed hash would let others confirm the site's rows"
            )
        event = event_from_dict(event.to_dict())  # normalized types: a stable hash

        def make_body(records: list[dict[str, Any]]) -> dict[str, Any]:
            self._check_anchors(records)  # nothing was cut off since the last head record and witness
            self._load(records)  # the file as it is now, under the lock
            if self.find(run_id=run_id, server_round=server_round, purpose=purpose):
                raise LedgerError(
                    f"the {purpose} release of round {server_round} of run {run_id!r} is already recorded in "
                    f"{self.path}: refusing to count it twice"
                )
            history = self.history(data_source)
            return {
                "run_id": run_id,
                "round": server_round,
                "time": _utc_now(),
                "site_id": self.site_id,
                "adapter_hash": adapter_hash,
                "dataset_fingerprint": dataset_fingerprint,
                "event": event.to_dict(),
                "delta": float(delta),
                "accountant": accountant,
                "epsilon": cumulative_epsilon([*history, event], delta=delta, accountant=accountant),
                "max_epsilon": None if max_epsilon is None else float(max_epsilon),
                "seeded_noise": bool(seeded_noise),
                "data_source": data_source,
                "purpose": purpose,
                **({} if guarantees is None else {"guarantees": guarantees.to_dict()}),
            }

        try:
            self._chain.append(make_body, after=self._advance_anchors)  # then head and witness, still locked
        except ChainError as e:
            raise LedgerError(f"cannot append to the site ledger of {self.site_id!r}: {e}") from e
        self._load(self._chain.records)
        return self._entries[-1]

    def attestation(self, entry: LedgerEntry) -> dict[str, Any]:
        """The site-signed epsilon attestation of ``entry`` for the server: flat, so it fits a ConfigRecord.

        ``entry`` holds the full ledger line, so anyone holding the roster can recompute the hash and check
        the signature; the other fields repeat it for reading.
        """
        record = self._records.get(entry.entry_hash)
        if record is None or entry.site_id != self.site_id:
            raise LedgerError(f"entry {entry.seq} is not an entry of the ledger of {self.site_id!r}")
        return make_attestation(record)


def make_attestation(record: Mapping[str, Any]) -> dict[str, Any]:
    """Attestation of a stored ledger record (the exact line, so its hash and signature verify)."""
    att: dict[str, Any] = {f: record[f] for f in ATTESTATION_FIELDS}
    att["entry"] = canonical_json(record)
    return att


def verify_attestation(attestation: Mapping[str, Any], public_key: Ed25519PublicKey) -> LedgerEntry:
    """Check a site's attestation; return the attested entry or raise :class:`LedgerError`.

    The embedded entry must hash to ``entry_hash``, the signature must verify under the site's roster key, and
    every repeated field must agree with the entry.
    """
    missing = [f for f in (*ATTESTATION_FIELDS, "entry") if f not in attestation]
    if missing:
        raise LedgerError(f"attestation is missing {missing}")
    try:
        record = json.loads(str(attestation["entry"]))
    except ValueError as e:
        raise LedgerError(f"attestation entry is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise LedgerError("attestation entry must be a JSON object")
    where = (
        f"attestation of {attestation.get('site_id')!r} for run {attestation.get('run_id')!r} "
        f"round {attestation.get('round')!r}"
    )
    if record_hash(record) != record.get("entry_hash"):
        raise LedgerError(f"{where}: entry_hash does not match the attested entry")
    if not signature_valid(
        public_key,
        kind=SITE_LEDGER_KIND,
        entry_hash=str(record["entry_hash"]),
        signature=str(record.get("signature")),
    ):
        raise LedgerError(f"{where}: signature does not verify under the site's roster key")
    for f in ATTESTATION_FIELDS:
        if json.loads(canonical_json(attestation[f])) != record.get(f):
            raise LedgerError(f"{where}: field {f!r} is {attestation[f]!r} but the signed entry says {record.get(f)!r}")
    return LedgerEntry.from_record(record)
