"""The witness of a site ledger: its entry count and last hash, signed by the site, kept on other storage.

The head record (:mod:`shared.ledger_head`) refuses a ledger cut back or deleted on its own. A ledger and its
head restored together from an older backup, or deleted together, agree with each other, and the site would
start over with less spent. The witness is a third, small file that the site rewrites after every append, as it
does the head, but that lives elsewhere: node config ``ledger-witness`` names it (a directory on another disk
or share, one that is not backed up and restored with the ledger); by default it is
``<site-dir>/ledger-witness.json``, beside the site's keys, which guards the ledger files alone (they may sit
elsewhere, ``ledger-path``) but not a site directory restored whole. It holds

    {"kind": "privatune.site-ledger-witness.v1", "site_id": ..., "count": n, "head_hash": <entry_hash of entry
     n-1; for n = 0 the chain's genesis hash>, "time": ..., "signature": <Ed25519 of the site's identity key>}

and a site opening its ledger to release data checks it (:func:`witness_lag`):

- the ledger holds fewer entries than the witness, or is missing, or its entry ``count - 1`` is not the one the
  witness names: refused, naming both counts. The operator restores the latest ledger, or goes on without the
  lost entries with ``privatune site accept-ledger``, which records that decision in the ledger
  (:mod:`shared.ledger_override`) and which the audit shows;
- the witness one entry behind: the crash window between the head write and the witness write: advanced;
  more than one behind: the witness was replaced by an older copy: refused;
- no witness and a ledger with entries: the first open with a witness (a ledger from before witnesses, or a new
  ``ledger-witness`` path): written from the ledger, with a warning;
- no witness and no entries: a new site, and the witness (count 0) is written before anything else, so it
  exists before the site's fingerprint key (made when the site first fingerprints its rows). A site whose
  fingerprint key exists while its ledger, head and witness are all missing has had them deleted: refused.

What it does not stop: a ledger, head and witness restored together (keep the witness's storage out of the
ledger's backups), a site directory deleted whole (the site then has new keys and must enrol again), and whoever
holds the site's identity key (they can sign any witness). The server's run ledgers still hold the site's signed
attestations, and ``privatune audit`` reports every attested entry missing from the site's ledger.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.hashchain import (
    ChainWriter,
    canonical_json,
    genesis_hash,
    record_hash,
    sign_hash,
    signature_valid,
    write_atomic,
)
from shared.ledger_head import HeadError

logger = logging.getLogger("privatune.ledger")

WITNESS_KIND = "privatune.site-ledger-witness.v1"
WITNESS_FIELDS = ("kind", "site_id", "count", "head_hash", "time", "signature")
ACCEPT_COMMAND = "privatune site accept-ledger"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WitnessRecord:
    """The ledger of ``site_id`` held ``count`` entries, the last hashing to ``head_hash``, at ``time``."""

    site_id: str
    count: int
    head_hash: str
    time: str
    signature: str | None  # None: an unsigned ledger (tests); a signed ledger's witness is always signed

    def body(self) -> dict[str, Any]:
        return {
            "kind": WITNESS_KIND,
            "site_id": self.site_id,
            "count": self.count,
            "head_hash": self.head_hash,
            "time": self.time,
        }

    def to_json(self) -> str:
        return canonical_json({**self.body(), "signature": self.signature}) + "\n"

    @classmethod
    def parse(cls, data: bytes, *, path: Path) -> WitnessRecord:
        """Parse a stored witness, naming the first problem (structure only: no signature check)."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HeadError("witness-corrupt", f"ledger witness {path} is not valid JSON ({e})") from e
        if not isinstance(raw, dict) or set(raw) != set(WITNESS_FIELDS):
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise HeadError("witness-corrupt", f"ledger witness {path} must hold {list(WITNESS_FIELDS)}, got {found}")
        if raw["kind"] != WITNESS_KIND:
            raise HeadError("witness-corrupt", f"ledger witness {path}: kind is {raw['kind']!r}, not {WITNESS_KIND!r}")
        count = raw["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise HeadError("witness-corrupt", f"ledger witness {path}: count must be an integer >= 0, got {count!r}")
        for name in ("site_id", "head_hash", "time"):
            if not isinstance(raw[name], str) or not raw[name]:
                raise HeadError("witness-corrupt", f"ledger witness {path}: {name} must be a non-empty string")
        if raw["signature"] is not None and not isinstance(raw["signature"], str):
            raise HeadError("witness-corrupt", f"ledger witness {path}: signature must be a hex string or null")
        return cls(raw["site_id"], count, raw["head_hash"], raw["time"], raw["signature"])


def read_witness(path: Path, *, site_id: str, public_key: Ed25519PublicKey | None) -> WitnessRecord | None:
    """The verified witness at ``path``, or None when there is none. Another site's, or (when ``public_key`` is
    given) one whose signature does not verify under it, is a :class:`HeadError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    witness = WitnessRecord.parse(data, path=path)
    if witness.site_id != site_id:
        raise HeadError("witness-foreign", f"ledger witness {path} belongs to {witness.site_id!r}, not {site_id!r}")
    digest = record_hash(witness.body())
    if public_key is not None and not (
        witness.signature is not None
        and signature_valid(public_key, kind=WITNESS_KIND, entry_hash=digest, signature=witness.signature)
    ):
        raise HeadError("witness-signature", f"ledger witness {path}: signature does not verify under the site's key")
    return witness


def write_witness(
    path: Path, *, site_id: str, records: list[dict[str, Any]], kind: str, signing_key: Ed25519PrivateKey | None
) -> WitnessRecord:
    """Write (atomically, mode 0600) the witness of a chain of ``kind`` whose records are ``records``. The
    witness's directory must exist: one on other storage that is not mounted is an error, never a new local
    directory."""
    path = Path(path)
    if not path.parent.is_dir():
        raise HeadError(
            "witness-missing",
            f"the directory of the ledger witness {path} does not exist (is its storage mounted?); create it, or "
            "set node config 'ledger-witness' to where the witness is kept",
        )
    head_hash = str(records[-1]["entry_hash"]) if records else genesis_hash(kind, site_id)
    witness = WitnessRecord(site_id, len(records), head_hash, _utc_now(), None)
    if signing_key is not None:
        signature = sign_hash(signing_key, kind=WITNESS_KIND, entry_hash=record_hash(witness.body()))
        witness = WitnessRecord(site_id, witness.count, head_hash, witness.time, signature)
    write_atomic(path, witness.to_json().encode())
    return witness


def witness_lag(
    witness: WitnessRecord | None,
    records: list[dict[str, Any]],
    *,
    ledger_path: Path,
    witness_path: Path,
    ledger_exists: bool,
    proof_of_use: Path | None,
) -> int | None:
    """How many of ``records`` (a verified chain, already checked against its head) the witness does not cover:
    0, or 1 after a crash between the head write and the witness write; None when there is no witness and one
    is to be written from the ledger as it is. Anything else raises :class:`HeadError` naming what is wrong.
    ``proof_of_use``: a file that exists once the site has opened its ledger before (its fingerprint key)."""
    n = len(records)
    accept = f"restore the latest ledger and head record, or go on without the lost entries with `{ACCEPT_COMMAND}`"
    if witness is None:
        if n == 0 and proof_of_use is not None and proof_of_use.exists():
            raise HeadError(
                "witness-missing",
                f"the site has used its ledger before (its fingerprint key {proof_of_use} exists), but no ledger "
                f"entries are at {ledger_path}, no head record beside it and no witness at {witness_path}: they "
                f"were deleted; {accept} (recorded in the ledger)",
            )
        return None
    if n < witness.count:
        found = f"holds {n} entries" if ledger_exists else "is missing"
        raise HeadError(
            "witness-rollback",
            f"the ledger {ledger_path} {found}, but its witness {witness_path} (signed by this site, {witness.time}) "
            f"says {witness.count} entries: the ledger and its head record were restored from an older copy, or "
            f"deleted, and entries {n}..{witness.count - 1} are not in it; {accept} (recorded in the ledger)",
        )
    if witness.count > 0 and records[witness.count - 1].get("entry_hash") != witness.head_hash:
        raise HeadError(
            "witness-fork",
            f"entry {witness.count - 1} of the ledger {ledger_path} is not the one its witness {witness_path} names "
            f"(ledger {str(records[witness.count - 1].get('entry_hash'))[:12]}, witness {witness.head_hash[:12]}): "
            f"the ledger was replaced by another history; {accept} (recorded in the ledger)",
        )
    if n - witness.count > 1:
        raise HeadError(
            "witness-behind",
            f"the ledger {ledger_path} holds {n} entries, but its witness {witness_path} names only {witness.count}: "
            "a crash leaves the witness at most one entry behind, so it was replaced by an older copy; "
            f"{accept} (recorded in the ledger)",
        )
    return n - witness.count


class LedgerWitness:
    """Keeps the witness of one chained site ledger in step with it (see the module docstring)."""

    def __init__(
        self,
        chain: ChainWriter,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey | None,
        proof_of_use: Path | None = None,
    ) -> None:
        self.chain = chain
        self.path = Path(path)
        self.proof_of_use = Path(proof_of_use) if proof_of_use is not None else None
        self._signing_key = signing_key
        lag = self._verify_on_open()
        if lag != 0 and self._signing_key is not None:
            chain.under_lock(self._catch_up)
        elif lag != 0:
            logger.warning("%s: its witness %s is not up to date; the site brings it up to date", chain.path, path)

    def _read(self) -> WitnessRecord | None:
        return read_witness(self.path, site_id=self.chain.owner, public_key=self.chain.public_key)

    def check(self, records: list[dict[str, Any]]) -> int | None:
        """``records`` against the witness on disk (see :func:`witness_lag`); raises :class:`HeadError`."""
        return witness_lag(
            self._read(),
            records,
            ledger_path=self.chain.path,
            witness_path=self.path,
            ledger_exists=self.chain.path.exists(),
            proof_of_use=self.proof_of_use,
        )

    def _verify_on_open(self) -> int | None:
        try:
            return self.check(self.chain.records)
        except HeadError as unlocked:
            if not self.chain.path.exists():
                raise
            failure = unlocked
        try:  # a writer may have been between its append and its witness write: look again, under its lock
            return self.chain.under_lock(self.check)
        except OSError:  # a reader that may not take the lock: what it saw stands
            raise failure from None

    def _catch_up(self, records: list[dict[str, Any]]) -> None:
        lag = self.check(records)  # again, under the lock: another writer may have written it already
        if lag == 0:
            return
        if lag is None and records:
            logger.warning(
                "%s: no ledger witness at %s; written from the ledger's %d entries (entries removed before now "
                "cannot be detected from it)",
                self.chain.path,
                self.path,
                len(records),
            )
        elif lag == 1:
            logger.warning(
                "%s: entry %s was appended but its witness was not written (a crash); the witness now names it",
                self.chain.path,
                records[-1]["seq"],
            )
        self.advance(records)

    def advance(self, records: list[dict[str, Any]]) -> None:
        """After an append, under the ledger's lock: write the witness of ``records``. Its count never goes
        down."""
        current = self._read()
        if current is not None and current.count > len(records):
            raise HeadError(
                "witness-rollback",
                f"refusing to move the ledger witness {self.path} back from {current.count} to {len(records)} entries",
            )
        write_witness(
            self.path,
            site_id=self.chain.owner,
            records=records,
            kind=self.chain.kind,
            signing_key=self._signing_key,
        )
