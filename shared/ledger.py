"""A site's own privacy ledger: one signed, hash-chained JSON line per round the site trained in.

The ledger lives on the site's disk so that the site never has to trust the server's account of its privacy.
Each entry records what was trained on (a fingerprint of the data set: a hash and a row count, no content),
the round's DP event, and the site's cumulative epsilon over every entry for the same data set, in every run.
The file is only ever appended to (see :mod:`shared.hashchain`); a problem found on open is an error naming
the line, never something repaired.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.hashchain import ChainError, ChainWriter, canonical_json, record_hash, signature_valid
from shared.ledger_head import LedgerAnchor, default_head_path
from shared.privacy import DpEvent, PrivacyError, check_accountant, check_delta, compose_epsilon

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
)
OPTIONAL_FIELDS = ("max_epsilon", "seeded_noise")  # absent in older entries
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


class LedgerError(ValueError):
    """A ledger is truncated, tampered, reordered, forked, foreign, badly signed, or an append is refused."""


# -- fingerprints and digests (hashes only, never content) --------------------------------------------------


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
    """Fingerprint of the records a site trains on, as loaded (e.g. a simulated partition).

    The hash covers a canonical serialization of the ``(text, label)`` rows in order, and nothing else: the
    budget follows the records, not the path or the name they were loaded under.
    """
    h = hashlib.sha256()
    for i, row in enumerate(rows):
        if len(row) != 2 or not isinstance(row[0], str) or isinstance(row[1], bool):
            raise LedgerError(f"row {i} must be a (text: str, label: int) pair, got {row!r}")
        h.update(json.dumps([row[0], int(row[1])], ensure_ascii=True).encode())
        h.update(b"\n")
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


def cumulative_epsilon(events: Iterable[DpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of ``events`` at ``delta``: what the ledger records, what budgets check."""
    return compose_epsilon(events, delta=delta, accountant=accountant)


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
    event: DpEvent
    delta: float
    accountant: str
    epsilon: float
    prev_hash: str
    entry_hash: str
    signature: str
    max_epsilon: float | None = None  # the site's budget when it trained this round (None: not recorded)
    seeded_noise: bool = False  # noise and sampling seeded from the run seed: epsilon not valid against the server

    def to_record(self) -> dict[str, Any]:
        """The entry as the JSON object stored on its line (``inf`` spelled ``"inf"``)."""
        record = {f: getattr(self, f) for f in ENTRY_FIELDS}
        record["event"] = self.event.to_dict()
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
            event = DpEvent.from_dict(dict(record["event"]))
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
            )
        except (PrivacyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger entry {record.get('seq', '?')} is malformed: {e}") from e
        return entry


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
    (:mod:`shared.ledger_head`, at ``head_path``, by default ``<ledger>.head.json`` beside it)."""

    def __init__(
        self,
        path: Path,
        *,
        site_id: str,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
        head_path: Path | None = None,
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
        except ChainError as e:
            raise LedgerError(f"site ledger of {site_id!r} is invalid: {e}") from e
        self._load(self._chain.records)

    def _load(self, records: list[dict[str, Any]]) -> None:
        self._records = {r["entry_hash"]: r for r in records}  # the stored lines, for attestations
        self._entries = [LedgerEntry.from_record(r) for r in records]

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        return self._chain.public_key

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def history(self, dataset_fingerprint: str) -> list[DpEvent]:
        """The DP events of every entry for this data set, across all runs, in ledger order."""
        return [e.event for e in self._entries if e.dataset_fingerprint == dataset_fingerprint]

    def spent(self, dataset_fingerprint: str, *, delta: float, accountant: str) -> float:
        """Epsilon spent so far on this data set, at ``delta``, recomputed from the events."""
        return cumulative_epsilon(self.history(dataset_fingerprint), delta=delta, accountant=accountant)

    def find(self, *, run_id: str, server_round: int, dataset_fingerprint: str) -> LedgerEntry | None:
        """The entry already recorded for this round of this run on this data set, if any (retry / resume)."""
        for e in self._entries:
            if e.run_id == run_id and e.round == server_round and e.dataset_fingerprint == dataset_fingerprint:
                return e
        return None

    def append(
        self,
        *,
        run_id: str,
        server_round: int,
        adapter_hash: str,
        dataset_fingerprint: str,
        event: DpEvent,
        delta: float,
        accountant: str,
        max_epsilon: float | None = None,
        seeded_noise: bool = False,
    ) -> LedgerEntry:
        """Record one trained round, with the cumulative epsilon over this data set's history and ``event``.

        Refuses a round already recorded for the same run and data set, so a retried or resumed round is never
        counted twice (use :meth:`find` to get the existing entry back). ``max_epsilon``, the site's budget
        when it decided to train, is recorded so that an audit can show the budget held; a round is recorded
        even over budget (it was trained: hiding it would be worse). ``seeded_noise`` marks a round whose DP
        noise and sampling were seeded from the run's seed (reproducible experiments): its epsilon does not
        hold against whoever knows that seed, and the audit says so.
        """
        check_delta(delta)
        check_accountant(accountant)
        if not isinstance(event, DpEvent):
            raise LedgerError(f"event must be a DpEvent, got {type(event).__name__}")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise LedgerError(f"server_round must be a non-negative integer, got {server_round!r}")
        if not run_id:
            raise LedgerError("run_id must be a non-empty string")
        if max_epsilon is not None and not max_epsilon > 0:
            raise LedgerError(f"max_epsilon must be > 0 (inf for no budget) or None, got {max_epsilon}")
        event = DpEvent.from_dict(event.to_dict())  # normalized types: a stable hash

        def make_body(records: list[dict[str, Any]]) -> dict[str, Any]:
            self._anchor.check(records)  # nothing was cut off since the last head record
            self._load(records)  # the file as it is now, under the lock
            if self.find(run_id=run_id, server_round=server_round, dataset_fingerprint=dataset_fingerprint):
                raise LedgerError(
                    f"round {server_round} of run {run_id!r} is already recorded for data set "
                    f"{dataset_fingerprint} in {self.path}: refusing to count it twice"
                )
            history = self.history(dataset_fingerprint)
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
            }

        try:
            self._chain.append(make_body, after=self._anchor.advance)  # then the head record, still locked
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
