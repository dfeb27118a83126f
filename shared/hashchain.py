"""Append-only, hash-chained, optionally Ed25519-signed JSON lines: the storage under both privacy ledgers.

One record per line. A record's ``entry_hash`` is the SHA-256 of the canonical JSON of every other field
(``prev_hash`` included), so each line commits to the whole history before it; the first line's ``prev_hash``
is a genesis hash that binds the file to its kind and owner (a site id, a run id), so another owner's file
fails on its first line. The ``signature`` (hex, or absent for an unsigned chain) is Ed25519 over
``"<kind>\\n<entry_hash>"``.

Crash safety: a record is written with one ``os.write`` of the full line and its ``"\\n"``, then ``fsync``.
A crash mid-write leaves a last line without its newline, which :func:`read_chain` reports as truncated.
Nothing here ever rewrites or truncates a file. A chained file, and any file written by :func:`write_atomic`,
is created with mode 0600 (owner read/write only, whatever the umask): ledgers say who trained when, on what.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHAIN_FIELDS = ("prev_hash", "entry_hash", "signature")
FILE_MODE = 0o600  # every ledger file: readable and writable by its owner only

T = TypeVar("T")

IssueKind = Literal["truncated", "corrupt", "gap", "reordered", "fork", "tampered", "signature", "foreign"]


class ChainError(ValueError):
    """A chained file is truncated, tampered, reordered, forked, foreign or badly signed."""


@dataclass(frozen=True)
class ChainIssue:
    """One problem found in a chained file, at a 1-based line number."""

    path: Path
    line: int
    kind: IssueKind
    detail: str

    def __str__(self) -> str:
        if self.kind in ("truncated", "corrupt"):  # "line 3 is truncated (...)"
            return f"{self.path}: line {self.line} is {self.detail}"
        return f"{self.path}: line {self.line}: {self.detail}"


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats spelled as strings (``"inf"``), so that every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, ASCII, strict JSON: the form that is hashed."""
    return json.dumps(json_safe(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def genesis_hash(kind: str, owner: str) -> str:
    """The ``prev_hash`` of a chain's first record: binds the file to its kind and owner."""
    return sha256_hex(f"{kind}\ngenesis\n{owner}".encode())


def record_hash(body: Mapping[str, Any]) -> str:
    """The ``entry_hash`` of a record: SHA-256 of the canonical JSON of all but the hash and signature."""
    return sha256_hex(canonical_json({k: v for k, v in body.items() if k not in ("entry_hash", "signature")}).encode())


def _signed_message(kind: str, entry_hash: str) -> bytes:
    return f"{kind}\n{entry_hash}".encode()


def sign_hash(key: Ed25519PrivateKey, *, kind: str, entry_hash: str) -> str:
    return key.sign(_signed_message(kind, entry_hash)).hex()


def signature_valid(key: Ed25519PublicKey, *, kind: str, entry_hash: str, signature: str) -> bool:
    try:
        key.verify(bytes.fromhex(signature), _signed_message(kind, entry_hash))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def seal(
    body: Mapping[str, Any], *, kind: str, prev_hash: str, signing_key: Ed25519PrivateKey | None
) -> dict[str, Any]:
    """``body`` with ``prev_hash``, ``entry_hash`` and (when a key is given) ``signature`` added."""
    clash = set(CHAIN_FIELDS) & body.keys()
    if clash:
        raise ChainError(f"record body must not set chain fields {sorted(clash)}")
    record = json_safe({**body, "prev_hash": prev_hash})
    record["entry_hash"] = record_hash(record)
    if signing_key is not None:
        record["signature"] = sign_hash(signing_key, kind=kind, entry_hash=record["entry_hash"])
    return record


@dataclass(frozen=True)
class ChainRead:
    """What :func:`read_chain` found: the records that verified, in order, and every problem after them."""

    records: list[dict[str, Any]]
    issues: list[ChainIssue]
    size: int  # bytes read

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def head(self) -> str | None:
        return self.records[-1]["entry_hash"] if self.records else None


def read_chain(
    path: Path, *, kind: str, owner: str, public_key: Ed25519PublicKey | None, owner_field: str
) -> ChainRead:
    """Read and verify every line of ``path`` (missing file: empty chain). Never raises on content problems.

    Checks, per line: complete (ends in a newline) and valid JSON; ``seq`` is the next integer;
    ``owner_field`` is ``owner``; ``prev_hash`` is the previous line's hash (genesis for the first);
    ``entry_hash`` matches the content; the signature verifies under ``public_key`` when one is given (a
    signed chain must sign every line). Verification goes on past a problem so that the audit can name every
    bad line; ``records`` holds the valid prefix only.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ChainRead([], [], 0)
    issues: list[ChainIssue] = []
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    expected_prev = genesis_hash(kind, owner)
    expected_seq = 0
    seen_hashes: dict[str, int] = {}
    prefix_valid = True

    def problem(line: int, issue_kind: IssueKind, message: str) -> None:
        nonlocal prefix_valid
        issues.append(ChainIssue(path, line, issue_kind, message))
        prefix_valid = False

    for index, raw in enumerate(complete):
        line = index + 1
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            problem(line, "corrupt", f"not a valid JSON record ({e})")
            expected_seq += 1
            continue
        seq = record.get("seq")
        if record.get(owner_field) != owner:
            problem(
                line,
                "foreign",
                f"{owner_field} is {record.get(owner_field)!r}, this ledger belongs to {owner!r}",
            )
        if not isinstance(seq, int) or isinstance(seq, bool):
            problem(line, "corrupt", f"seq is {seq!r}, expected an integer")
        elif seq > expected_seq:
            missing = (
                f"entry {expected_seq} is" if seq == expected_seq + 1 else f"entries {expected_seq}..{seq - 1} are"
            )
            problem(line, "gap", f"seq {seq} where seq {expected_seq} was expected: {missing} missing")
        elif seq < expected_seq:
            problem(
                line,
                "reordered",
                f"seq {seq} where seq {expected_seq} was expected: entries out of order or repeated",
            )
        actual_hash = record_hash(record)
        if record.get("entry_hash") != actual_hash:
            problem(line, "tampered", f"entry_hash does not match the entry's content (entry {seq} was modified)")
        prev = record.get("prev_hash")
        if prev != expected_prev:
            if line == 1 and prev != genesis_hash(kind, owner):
                problem(line, "foreign", f"first entry does not start a {kind} chain of {owner!r} (wrong genesis)")
            elif prev in seen_hashes and seen_hashes[prev] != line - 1:
                problem(
                    line,
                    "fork",
                    f"prev_hash points to line {seen_hashes[prev]}, not line {line - 1}: the chain forks",
                )
            elif line > 1:
                problem(
                    line,
                    "reordered",
                    f"prev_hash is not the hash of line {line - 1}: entries were removed, inserted or reordered",
                )
        if public_key is not None:
            sig = record.get("signature")
            if not isinstance(sig, str) or not signature_valid(
                public_key, kind=kind, entry_hash=str(record.get("entry_hash")), signature=sig
            ):
                problem(line, "signature", "signature does not verify under the site's public key")
        if isinstance(record.get("entry_hash"), str):
            seen_hashes.setdefault(record["entry_hash"], line)
            expected_prev = record["entry_hash"]
        expected_seq = (seq if isinstance(seq, int) and not isinstance(seq, bool) else expected_seq) + 1
        if prefix_valid:
            records.append(record)
    if tail:
        problem(
            len(complete) + 1,
            "truncated",
            f"truncated ({len(tail)} bytes without a newline): an interrupted write",
        )
    return ChainRead(records, issues, len(data))


def _fsync_dir(directory: Path) -> None:
    """Make a new or renamed directory entry durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _locked_append_fd(path: Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL first: only the writer that creates the file sets its mode
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        created = False
    try:
        if created:
            os.fchmod(fd, FILE_MODE)  # exactly 0600: a umask can only have removed bits
        fcntl.flock(fd, fcntl.LOCK_EX)
        if created:
            _fsync_dir(path.parent)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once: a temporary file in the same directory (mode 0600), written
    and fsynced, renamed over ``path``, then the directory fsynced. A crash leaves the old file or the new one,
    never a mix (at worst a stray ``.<name>.*.tmp`` beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ChainWriter:
    """Appends records to one chained file; verifies the file on open and refuses to extend a bad one."""

    def __init__(
        self,
        path: Path,
        *,
        kind: str,
        owner: str,
        owner_field: str,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        if signing_key is not None:
            derived = signing_key.public_key()
            if public_key is not None and derived.public_bytes_raw() != public_key.public_bytes_raw():
                raise ChainError(f"{path}: the signing key does not match the public key given for {owner!r}")
            public_key = derived
        self.path = Path(path)
        self.kind = kind
        self.owner = owner
        self.owner_field = owner_field
        self._signing_key = signing_key
        self._public_key = public_key
        self._read = self._verified_read()

    def _verified_read(self) -> ChainRead:
        read = read_chain(
            self.path,
            kind=self.kind,
            owner=self.owner,
            public_key=self._public_key,
            owner_field=self.owner_field,
        )
        if read.issues:
            raise ChainError(str(read.issues[0]))
        return read

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._read.records)

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        return self._public_key

    def _refresh(self, fd: int) -> None:
        if os.fstat(fd).st_size != self._read.size:  # someone appended since we read: re-verify
            self._read = self._verified_read()

    def under_lock(self, action: Callable[[list[dict[str, Any]]], T]) -> T:
        """Run ``action`` on the chain's records, re-read and re-verified under the file lock; nothing is
        appended (e.g. to bring a side record such as a ledger's head up to date without racing a writer)."""
        with _locked_append_fd(self.path) as fd:
            self._refresh(fd)
            return action(list(self._read.records))

    def append(
        self,
        make_body: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
        *,
        after: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> dict[str, Any]:
        """Seal a new record onto the chain and write it durably as one line.

        ``make_body`` gets the chain's current records (re-read and re-verified under the file lock when
        another writer appended since) and returns the new record's body; ``seq`` is set here. Anything it
        raises propagates with nothing written. ``after`` gets every record, the new one last, once it is on
        disk and still under the lock (e.g. to write the ledger's head record); what it raises propagates with
        the record written.
        """
        if self._public_key is not None and self._signing_key is None:
            raise ChainError(f"{self.path}: opened without a signing key, cannot append to a signed ledger")
        with _locked_append_fd(self.path) as fd:
            self._refresh(fd)
            body = make_body(list(self._read.records))
            record = seal(
                {**body, "seq": len(self._read.records)},
                kind=self.kind,
                prev_hash=self._read.head or genesis_hash(self.kind, self.owner),
                signing_key=self._signing_key,
            )
            line = (canonical_json(record) + "\n").encode()
            written = os.write(fd, line)
            while written < len(line):  # a short write still appends, in order, under the lock
                written += os.write(fd, line[written:])
            os.fsync(fd)
            self._read = ChainRead([*self._read.records, record], [], self._read.size + len(line))
            if after is not None:
                after(list(self._read.records))
        return record
