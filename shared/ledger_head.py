"""The signed head record of a site ledger: how many entries it holds and the hash of the last one.

A hash chain shows that no line was edited, removed from the middle or reordered, but a chain cut back at a
line boundary, or a deleted file, is still a valid chain: a site that reopened it would see less spent and
grant itself a fresh budget. The head record closes that hole. It is a small JSON file, stored apart from the
ledger (node config ``ledger-head-path``; by default ``<ledger>.head.json`` beside it), holding

    {"kind": "privatune.site-ledger-head.v1", "site_id": ..., "count": n, "head_hash": <entry_hash of entry n-1>,
     "adopted_count": null | k, "time": ..., "signature": <Ed25519 of the site's identity key>}

It is rewritten atomically (:func:`shared.hashchain.write_atomic`: temporary file, fsync, rename) after every
append, under the ledger's file lock, and its count only ever grows. On open:

- no ledger and no head (or an empty ledger and no head): a new, empty ledger;
- a head, and a ledger that is missing, shorter than ``count``, or whose entry ``count - 1`` has another hash:
  an error naming what is wrong, never repaired (entries were removed, or the ledger was replaced);
- a ledger with entries and no head: an error too, so that deleting the head cannot re-anchor a cut ledger.
  A ledger written before head records existed is adopted once, on purpose, with :func:`adopt_head`
  (``python -m shared.ledger_head adopt``); the head then records ``adopted_count``, and the audit says that
  the entries before it were never anchored;
- a ledger exactly one entry longer than its head: the crash window between the ledger's fsync and the head's
  rename. That entry has already passed the chain's checks (its hash, its link, and its signature when the
  ledger is signed); a writer advances the head over it at once, a reader accepts it. Two or more
  unanchored entries cannot come from one crash (each append writes its head before the next begins): an
  error, as the head must then have been replaced by an older copy.

What it does not stop: whoever holds the site's identity key can sign any head, and restoring the ledger
and its head together from an older backup is consistent; the site's witness on other storage
(:mod:`shared.ledger_witness`) catches that. And the server's run ledgers hold the site's signed attestations:
``privatune audit`` reports every attested entry missing from, or different in, the site's ledger (see
``docs/privacy-audit.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.hashchain import (
    ChainError,
    ChainWriter,
    canonical_json,
    record_hash,
    sign_hash,
    signature_valid,
    write_atomic,
)

logger = logging.getLogger("privatune.ledger")

HEAD_KIND = "privatune.site-ledger-head.v1"
HEAD_SUFFIX = ".head.json"
HEAD_FIELDS = ("kind", "site_id", "count", "head_hash", "adopted_count", "time", "signature")
ADOPT_COMMAND = "python -m shared.ledger_head adopt"


class HeadError(ChainError):
    """A ledger does not match its head record, or the head record itself is bad. ``kind`` names the problem
    for the audit: missing (ledger deleted), rollback (entries removed), fork (ledger replaced), head-missing,
    head-behind, head-corrupt, head-foreign, head-signature."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def default_head_path(ledger_path: Path) -> Path:
    """``privacy_ledger.jsonl`` -> ``privacy_ledger.head.json``, in the same directory."""
    ledger_path = Path(ledger_path)
    return (
        ledger_path.with_name(ledger_path.stem + HEAD_SUFFIX)
        if ledger_path.suffix
        else Path(f"{ledger_path}{HEAD_SUFFIX}")
    )


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class HeadRecord:
    """One head record: the ledger of ``site_id`` holds ``count`` entries, the last one hashing to
    ``head_hash``. ``adopted_count``: the entries on disk when a ledger older than head records was adopted
    (None: anchored since its first entry)."""

    site_id: str
    count: int
    head_hash: str
    adopted_count: int | None
    time: str
    signature: str | None  # None: an unsigned ledger (tests); a signed ledger's head is always signed

    def body(self) -> dict[str, Any]:
        return {
            "kind": HEAD_KIND,
            "site_id": self.site_id,
            "count": self.count,
            "head_hash": self.head_hash,
            "adopted_count": self.adopted_count,
            "time": self.time,
        }

    def digest(self) -> str:
        return record_hash(self.body())

    def to_json(self) -> str:
        return canonical_json({**self.body(), "signature": self.signature}) + "\n"

    @classmethod
    def parse(cls, data: bytes, *, path: Path) -> HeadRecord:
        """Parse a stored head record, naming the first problem (structure only: no signature check)."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HeadError("head-corrupt", f"head record {path} is not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise HeadError("head-corrupt", f"head record {path} must be a JSON object")
        if set(raw) != set(HEAD_FIELDS):
            missing, unknown = sorted(set(HEAD_FIELDS) - set(raw)), sorted(set(raw) - set(HEAD_FIELDS))
            raise HeadError("head-corrupt", f"head record {path}: missing fields {missing}, unknown fields {unknown}")
        if raw["kind"] != HEAD_KIND:
            raise HeadError("head-corrupt", f"head record {path}: kind is {raw['kind']!r}, expected {HEAD_KIND!r}")
        count, adopted = raw["count"], raw["adopted_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise HeadError("head-corrupt", f"head record {path}: count must be an integer >= 1, got {count!r}")
        if adopted is not None and (
            isinstance(adopted, bool) or not isinstance(adopted, int) or not 0 < adopted <= count
        ):
            raise HeadError(
                "head-corrupt", f"head record {path}: adopted_count must be null or in 1..{count}, got {adopted!r}"
            )
        for name in ("site_id", "head_hash", "time"):
            if not isinstance(raw[name], str) or not raw[name]:
                raise HeadError("head-corrupt", f"head record {path}: {name} must be a non-empty string")
        if raw["signature"] is not None and not isinstance(raw["signature"], str):
            raise HeadError("head-corrupt", f"head record {path}: signature must be a hex string or null")
        return cls(raw["site_id"], count, raw["head_hash"], adopted, raw["time"], raw["signature"])


def read_head(path: Path, *, site_id: str, public_key: Ed25519PublicKey | None) -> HeadRecord | None:
    """The verified head record at ``path``, or None when there is none. A head of another site, or (when
    ``public_key`` is given) one whose signature does not verify under it, is a :class:`HeadError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    head = HeadRecord.parse(data, path=path)
    if head.site_id != site_id:
        raise HeadError("head-foreign", f"head record {path} belongs to {head.site_id!r}, not {site_id!r}")
    if public_key is not None and not (
        head.signature is not None
        and signature_valid(public_key, kind=HEAD_KIND, entry_hash=head.digest(), signature=head.signature)
    ):
        raise HeadError("head-signature", f"head record {path}: signature does not verify under the site's key")
    return head


def unanchored(
    head: HeadRecord | None,
    records: list[dict[str, Any]],
    *,
    ledger_path: Path,
    head_path: Path,
    ledger_exists: bool,
) -> int:
    """How many of ``records`` (a verified chain) the head does not cover yet: 0, or 1 after a crash between
    an append and its head write. Anything else raises :class:`HeadError` naming what is wrong."""
    n = len(records)
    if head is None:
        if n == 0:
            return 0
        raise HeadError(
            "head-missing",
            f"the ledger {ledger_path} holds {n} entries but has no head record at {head_path}: a deleted head is "
            "never re-anchored (it would let a ledger cut back in the meantime pass); if this ledger was written "
            f"before head records existed, adopt it once with `{ADOPT_COMMAND} --ledger {ledger_path} ...` "
            "(docs/privacy-audit.md)",
        )
    if not ledger_exists:
        raise HeadError(
            "missing",
            f"the ledger {ledger_path} is missing, but its signed head record says {head.count} entries "
            f"({head_path}): the ledger was deleted",
        )
    if n < head.count:
        removed = f"entry {n} was" if n == head.count - 1 else f"entries {n}..{head.count - 1} were"
        raise HeadError(
            "rollback",
            f"the ledger holds {n} entries, but its signed head record says {head.count} entries: {removed} "
            f"removed (cut back, or restored from an older copy) ({ledger_path}, head {head_path})",
        )
    anchored = records[head.count - 1].get("entry_hash")
    if anchored != head.head_hash:
        raise HeadError(
            "fork",
            f"entry {head.count - 1} of the ledger is not the one its signed head record anchors (ledger "
            f"{str(anchored)[:12]}, head {head.head_hash[:12]}): the ledger was replaced or rewritten "
            f"({ledger_path}, head {head_path})",
        )
    if n - head.count > 1:
        raise HeadError(
            "head-behind",
            f"the ledger holds {n} entries, but its signed head record anchors only {head.count}: a crash leaves "
            f"at most one entry unanchored, so the head was replaced by an older one ({ledger_path}, head "
            f"{head_path})",
        )
    return n - head.count


class LedgerAnchor:
    """Keeps the head record of one chained site ledger in step with it (see the module docstring)."""

    def __init__(self, chain: ChainWriter, head_path: Path, *, signing_key: Ed25519PrivateKey | None) -> None:
        self.chain = chain
        self.head_path = Path(head_path)
        self._signing_key = signing_key
        self.head: HeadRecord | None = None
        lag = self._verify_on_open()
        if lag and self._signing_key is not None:  # the crash window: anchor the one entry now, under the lock
            chain.under_lock(self._advance_after_crash)
        elif lag:
            logger.warning(
                "%s: the last entry (%s) is not anchored by the head record yet (a crash between an append and "
                "its head write); the site advances the head when it next opens the ledger",
                self.chain.path,
                chain.records[-1]["seq"],
            )

    def _verify(self, records: list[dict[str, Any]]) -> int:
        self.head = self._read()
        return self._check(records)

    def _verify_on_open(self) -> int:
        try:
            return self._verify(self.chain.records)
        except HeadError as unlocked:
            if not self.chain.path.exists():
                raise
            failure = unlocked
        try:  # a writer may have been between its append and its head write: look again, under its lock
            return self.chain.under_lock(self._verify)
        except OSError:  # a reader that may not take the lock (read-only file or file system): what it saw stands
            raise failure from None

    def _read(self) -> HeadRecord | None:
        return read_head(self.head_path, site_id=self.chain.owner, public_key=self.chain.public_key)

    def _check(self, records: list[dict[str, Any]]) -> int:
        return unanchored(
            self.head,
            records,
            ledger_path=self.chain.path,
            head_path=self.head_path,
            ledger_exists=self.chain.path.exists(),
        )

    def check(self, records: list[dict[str, Any]]) -> None:
        """Before an append, under the ledger's lock: the records about to be extended match the head."""
        self.head = self._read()
        self._check(records)

    def _advance_after_crash(self, records: list[dict[str, Any]]) -> None:
        self.check(records)  # re-read under the lock: another writer may have advanced it already
        if self.head is not None and self.head.count < len(records):
            logger.warning(
                "%s: entry %s was appended but its head record was not written (a crash); its chain and "
                "signature verify, so the head now anchors it",
                self.chain.path,
                records[-1]["seq"],
            )
            self.advance(records)

    def advance(self, records: list[dict[str, Any]]) -> None:
        """After an append, under the ledger's lock: write the head of ``records``. Its count never goes down."""
        current = self._read()
        if current is not None and current.count > len(records):
            raise HeadError(
                "rollback",
                f"refusing to move the head record {self.head_path} back from {current.count} to "
                f"{len(records)} entries",
            )
        adopted = current.adopted_count if current is not None else None
        self.head = write_head(
            self.head_path,
            site_id=self.chain.owner,
            records=records,
            adopted_count=adopted,
            signing_key=self._signing_key,
        )


def write_head(
    path: Path,
    *,
    site_id: str,
    records: list[dict[str, Any]],
    adopted_count: int | None,
    signing_key: Ed25519PrivateKey | None,
) -> HeadRecord:
    """Write (atomically, mode 0600) the head record of a chain whose records are ``records``."""
    if not records:
        raise HeadError("head-corrupt", f"{path}: an empty ledger has no head record")
    head = HeadRecord(site_id, len(records), str(records[-1]["entry_hash"]), adopted_count, _utc_now(), None)
    if signing_key is not None:
        head = HeadRecord(
            site_id,
            head.count,
            head.head_hash,
            adopted_count,
            head.time,
            sign_hash(signing_key, kind=HEAD_KIND, entry_hash=head.digest()),
        )
    write_atomic(Path(path), head.to_json().encode())
    return head


def adopt_head(
    ledger_path: Path,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    head_path: Path | None = None,
) -> HeadRecord:
    """Anchor a ledger written before head records existed, ONCE, on an operator's decision.

    The whole chain must verify under ``signing_key``; a head record must not exist (an existing one is never
    replaced: that would re-anchor a ledger cut back since). The head records ``adopted_count``, so every
    later head and every audit says that the entries before it were never anchored: that they were complete
    when adopted rests on the server's attestations (``privatune audit`` with the run ledgers). Nothing in the
    ledger is changed.
    """
    from shared.ledger import SITE_LEDGER_KIND  # the site ledger's chain kind (shared.ledger imports this module)

    ledger_path = Path(ledger_path)
    head_path = Path(head_path) if head_path is not None else default_head_path(ledger_path)
    chain = ChainWriter(
        ledger_path, kind=SITE_LEDGER_KIND, owner=site_id, owner_field="site_id", signing_key=signing_key
    )
    if not chain.records:
        raise HeadError("head-missing", f"nothing to adopt: the ledger {ledger_path} has no entries")

    def adopt(records: list[dict[str, Any]]) -> HeadRecord:
        if head_path.exists():
            raise HeadError(
                "head-foreign",
                f"{head_path} already exists: a head record is never replaced (it anchors what the ledger held)",
            )
        return write_head(
            head_path, site_id=site_id, records=records, adopted_count=len(records), signing_key=signing_key
        )

    head = chain.under_lock(adopt)
    logger.warning(
        "ADOPTED the ledger %s of %s with %d entries that were never anchored: removed entries before this point "
        "cannot be detected from the head record, only from the server's attestations (privatune audit with the "
        "run ledgers). Head record: %s",
        ledger_path,
        site_id,
        head.count,
        head_path,
    )
    return head


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.ledger_head adopt --ledger L --site-id S --identity-key K [--head H]``."""
    from shared.identity import IdentityError, load_private_key

    parser = argparse.ArgumentParser(prog="python -m shared.ledger_head", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "adopt",
        help="anchor a site ledger written before head records existed (once; see docs/privacy-audit.md)",
    )
    p.add_argument("--ledger", type=Path, required=True, help="the site's privacy_ledger.jsonl")
    p.add_argument("--site-id", required=True)
    p.add_argument("--identity-key", type=Path, required=True, help="the site's identity_ed25519.pem")
    p.add_argument("--head", type=Path, help="where the head record goes (default: beside the ledger)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        head = adopt_head(
            args.ledger, site_id=args.site_id, signing_key=load_private_key(args.identity_key), head_path=args.head
        )
    except (ChainError, IdentityError, OSError) as e:
        print(f"{parser.prog} adopt: error: {e}", file=sys.stderr)
        return 1
    print(f"adopted {head.count} entries of {args.ledger}; head record {args.head or default_head_path(args.ledger)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
