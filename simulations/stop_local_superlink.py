"""Stop the local SuperLink that ``flwr run . local`` started and left running, by its process id.

``flwr run`` starts ``flower-superlink`` detached, the first time a ``:local:`` connection needs one, and
leaves it running for the next run; Flower 1.41 writes no PID file. This finds that one process, and no other:
a ``flower-superlink`` of the current user whose ``--log-file`` is ``$FLWR_HOME/local-superlink/superlink.log``
(Flower's own path for it), sends it SIGTERM, and waits for it to exit (SIGKILL after ``--timeout`` seconds).
Its SuperExec child exits with it. Linux (reads ``/proc``)::

    python simulations/stop_local_superlink.py            # FLWR_HOME as flwr resolves it (default ~/.flwr)
    python simulations/stop_local_superlink.py --dry-run  # only print the PID
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr``: where ``flwr`` keeps its config and its local SuperLink's files."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().absolute()


def local_superlink_pids(home: Path, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of this user's ``flower-superlink`` processes logging to ``home``'s local-superlink log."""
    log_file = str(home / "local-superlink" / "superlink.log")
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        is_superlink = any(Path(a).name == "flower-superlink" for a in args[:2])
        logs_here = any(a == "--log-file" and b == log_file for a, b in zip(args, args[1:], strict=False))
        if is_superlink and logs_here:
            found.append(int(entry.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return stat.read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop(pid: int, *, timeout: float) -> str:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return "stopped"
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return "killed (it did not exit on SIGTERM)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the PID, stop nothing")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait after SIGTERM")
    args = parser.parse_args(argv)
    if not Path("/proc").is_dir():
        print("no /proc here: stop the flower-superlink process of this FLWR_HOME by hand", file=sys.stderr)
        return 2
    home = flwr_home()
    pids = local_superlink_pids(home)
    if not pids:
        print(f"no local SuperLink of {home} is running")
        return 0
    for pid in pids:
        print(f"local SuperLink of {home}: PID {pid}" + ("" if args.dry_run else f" {stop(pid, timeout=args.timeout)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
