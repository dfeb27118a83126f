"""One release of a data source at a time: a site's budget check and the ledger entry it leads to are one step.

A site checks its budget before it trains a round (or answers an evaluation) and records the release in its
ledger after. Two runs asking the same site at once would each check against a history without the other's
release, and both could go ahead on a budget that covers one. So the site's handlers run inside
:func:`exclusive_release`: an exclusive OS file lock (``flock``) on a lock file beside the ledger, one per data
source (the budget belongs to the source), held from before the ledger is read until the release is recorded.
Every process of the site sees it (Flower starts one ClientApp process per message). A second release of the
same source while one is in progress is declined at once rather than queued: a round takes minutes, and the
run that asked goes on without this site for that round. The decline, which goes to that run's server, says
only that the source is busy; which run holds it (another federation's, perhaps) is logged at the site only.
Other sources are not held up.

A crash between the check and the record loses no budget and leaves nothing to resolve: the kernel releases the
lock of a process that dies, and nothing left the site before its entry was written (the reply that carries the
update is made after the append). The lock file holds a line naming the release in progress, for the site's
log; it is not a record, and is emptied when the lock is let go.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_MODE = 0o600
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ReleaseInProgress(RuntimeError):
    """Another release of the same data source holds the lock: this one is declined, not queued. The message is
    what the declined run's server may read; ``holder`` (the release in progress) and ``path`` are for the site."""

    def __init__(self, data_source: str, *, holder: str, path: Path) -> None:
        super().__init__(
            f"another release of data source {data_source!r} is in progress at this site; one release of a data "
            "source at a time, so that its budget check and its ledger entry cannot interleave with another's"
        )
        self.holder = holder
        self.path = path


def lock_path(ledger_path: Path, data_source: str) -> Path:
    """``<ledger stem>.release-<source>.lock`` beside the ledger; a source name that is not a plain file name
    (letters, digits, ``.``, ``_``, ``-``) is spelled by the first 16 hex digits of its SHA-256."""
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(f"data_source must be a non-empty string, got {data_source!r}")
    ledger_path = Path(ledger_path)
    tag = data_source if _PLAIN_NAME.fullmatch(data_source) else hashlib.sha256(data_source.encode()).hexdigest()[:16]
    return ledger_path.with_name(f"{ledger_path.stem}.release-{tag}.lock")


@contextmanager
def exclusive_release(ledger_path: Path, data_source: str, *, holder: str) -> Iterator[None]:
    """Hold the data source's release lock for the ``with`` block, or raise :class:`ReleaseInProgress` at once
    when another process or thread does. ``holder`` says which release this is (run, round), for the log of the
    site that declines another meanwhile."""
    path = lock_path(ledger_path, data_source)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            in_progress = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "unnamed"
            raise ReleaseInProgress(data_source, holder=in_progress, path=path) from None
        os.ftruncate(fd, 0)
        now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        os.pwrite(fd, f"{holder}, pid {os.getpid()}, since {now}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
