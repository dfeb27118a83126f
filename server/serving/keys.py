"""API keys of the inference service: named, stored only as SHA-256 hashes, revocable, in one 0600 file.

A key is ``ptk_`` followed by 32 random bytes from :mod:`secrets` (URL-safe base64); the operator sees it once,
when it is created. The key file keeps its name, the SHA-256 of the key, when it was created and, once revoked,
when that happened: a revoked key stays on record and never authenticates again. A running service re-reads
the file when it changes, so ``privatune serve-keys revoke`` takes effect without a restart.

256 random bits leave nothing to guess, so a plain SHA-256 (not a slow password hash) is what is stored; a
presented key is hashed and compared with every active hash in constant time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KEY_FILE_KIND = "privatune-serve-keys"
KEY_FILE_VERSION = 1
TOKEN_PREFIX = "ptk_"
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 256  # anything longer is not one of ours: refused before hashing
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyFileError(ValueError):
    """A key file that is unreadable, malformed, too open, or a bad key name."""


@dataclass(frozen=True)
class ApiKey:
    """One key's record: never the key itself."""

    name: str
    sha256: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(
            f"key name must be 1-64 characters of letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), got {name!r}"
        )
    return name


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"key file {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})")


def read_keys(path: Path) -> list[ApiKey]:
    """Every key on record in ``path`` (active and revoked), checked; a missing file holds none."""
    if not path.exists():
        return []
    _check_mode(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyFileError(f"key file {path} is not readable JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("kind") != KEY_FILE_KIND:
        raise KeyFileError(f"{path} is not a PrivaTune key file (kind must be {KEY_FILE_KIND!r})")
    if payload.get("version") != KEY_FILE_VERSION:
        raise KeyFileError(f"key file {path} has version {payload.get('version')!r}, expected {KEY_FILE_VERSION}")
    rows = payload.get("keys")
    if not isinstance(rows, list):
        raise KeyFileError(f"key file {path}: 'keys' must be a list")
    keys = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"name", "sha256", "created", "revoked"}:
            raise KeyFileError(f"key file {path}: entry {i} must have exactly name, sha256, created, revoked")
        check_name(row["name"])
        if not (isinstance(row["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", row["sha256"])):
            raise KeyFileError(f"key file {path}: entry {i} ({row['name']}) has no SHA-256 hex digest")
        if not isinstance(row["created"], str) or not (row["revoked"] is None or isinstance(row["revoked"], str)):
            raise KeyFileError(f"key file {path}: entry {i} ({row['name']}) has bad created/revoked times")
        keys.append(ApiKey(row["name"], row["sha256"], row["created"], row["revoked"]))
    active = [k.name for k in keys if k.active]
    if len(active) != len(set(active)):
        raise KeyFileError(f"key file {path}: two active keys share a name")
    return keys


def _write_keys(path: Path, keys: list[ApiKey]) -> None:
    """Write to a 0600 temp file, fsync, rename: a crash leaves the old file or the new one."""
    payload = {"kind": KEY_FILE_KIND, "version": KEY_FILE_VERSION, "keys": [asdict(k) for k in keys]}
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One editor of the key file at a time (``create`` and ``revoke`` read, change and rewrite it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_key(path: Path, name: str) -> str:
    """Add an active key called ``name``; returns the key, which is stored nowhere (show it once)."""
    check_name(name)
    with _locked(path):
        keys = read_keys(path)
        if any(k.name == name and k.active for k in keys):
            raise KeyFileError(f"an active key named {name!r} exists in {path}; revoke it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        _write_keys(path, [*keys, ApiKey(name, hash_token(token), _now())])
    return token


def revoke_key(path: Path, name: str) -> ApiKey:
    """Mark the active key ``name`` revoked (its record stays); returns the revoked record."""
    check_name(name)
    with _locked(path):
        keys = read_keys(path)
        matches = [i for i, k in enumerate(keys) if k.name == name and k.active]
        if not matches:
            raise KeyFileError(f"no active key named {name!r} in {path}")
        i = matches[0]
        keys[i] = ApiKey(keys[i].name, keys[i].sha256, keys[i].created, _now())
        _write_keys(path, keys)
    return keys[i]


class KeyStore:
    """What the service checks keys against: the key file, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._active: list[ApiKey] = []
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        """Read the file if it changed; a missing or bad file raises :class:`KeyFileError` (fail closed)."""
        with self._lock:
            try:
                stamp = self._file_stamp()
            except FileNotFoundError as e:
                self._active, self._stamp = [], None
                raise KeyFileError(
                    f"key file {self.path} does not exist; create a key: privatune serve-keys create NAME"
                ) from e
            if stamp == self._stamp:
                return
            try:
                keys = read_keys(self.path)
            except KeyFileError:
                self._active, self._stamp = [], None
                raise
            self._active, self._stamp = [k for k in keys if k.active], stamp

    @property
    def active_names(self) -> list[str]:
        return [k.name for k in self._active]

    def authenticate(self, token: str | None) -> str | None:
        """The name of the active key ``token`` is, or None. Compares with every active hash (no early exit)."""
        self.reload()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        presented = hash_token(token)
        found: str | None = None
        for key in self._active:
            if hmac.compare_digest(key.sha256, presented) and found is None:
                found = key.name
        return found


def describe(keys: list[ApiKey]) -> list[dict[str, Any]]:
    """Rows for ``serve-keys list``: name, state and times, never a hash."""
    return [
        {"name": k.name, "state": "active" if k.active else "revoked", "created": k.created, "revoked": k.revoked}
        for k in keys
    ]
