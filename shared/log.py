"""PrivaTune's own console output: one plain line per event on stdout, Flower's logs only when they warn."""

from __future__ import annotations

import logging
import sys


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
