"""PrivaTune's own console output: one plain line per event on stdout, Flower's logs only when they warn."""

from __future__ import annotations

import logging
import sys
import threading
import time


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at the time (pytest's capture, a redirect), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stdout

    @stream.setter
    def stream(self, _value):  # type: ignore[no-untyped-def]
        pass


def configure_logging(*, verbose: bool = False) -> None:
    """Idempotent: safe to call from the CLI and again from the ServerApp in its own process."""
    ours = logging.getLogger("privatune")
    if not any(getattr(h, "_privatune", False) for h in ours.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._privatune = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


PROGRESS_INTERVAL_S = 15.0  # a "still running" line this often while a round is in flight


class RoundProgress:
    """While a round runs, log a line every ``interval_s`` seconds: the seconds elapsed and, once earlier
    rounds have given a duration, the seconds left and the clock time it should end. A context manager:

        with RoundProgress("round 2/5", expected_s=41.0):
            ...  # the round
    """

    def __init__(self, label: str, *, expected_s: float | None = None, interval_s: float = PROGRESS_INTERVAL_S):
        self.label = label
        self.expected_s = expected_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def line(self, elapsed: float) -> str:
        """The progress line after ``elapsed`` seconds."""
        text = f"{self.label} | running: {elapsed:.0f}s"
        if self.expected_s is not None and self.expected_s > 0:
            left = self.expected_s - elapsed
            if left > 0:
                done = min(elapsed / self.expected_s, 1.0)
                eta = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
                text += f" [{_bar(done)}] about {left:.0f}s left (ETA {eta})"
            else:
                text += f" (longer than the {self.expected_s:.0f}s earlier rounds took)"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            logging.getLogger("privatune").info(self.line(time.monotonic() - self._started))

    def __enter__(self) -> RoundProgress:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="privatune-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _bar(done: float, width: int = 20) -> str:
    filled = int(round(done * width))
    return "#" * filled + "." * (width - filled)
