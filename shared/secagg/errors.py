"""The ways a secure-aggregation round can fail."""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggMessageError(SecAggError, ValueError):
    """A protocol message is malformed: a missing key, a value of the wrong type, lists of unequal length."""


class SecAggProtocolError(SecAggError):
    """A message is well formed but breaks the protocol: a bad signature, a replay, a stage out of order.

    A client that raises it refuses the round (and is counted as dropped); it never reveals anything more.
    """


class SecAggAbort(SecAggError):
    """The round cannot complete without revealing more than the sum: aborted, nothing is revealed."""
