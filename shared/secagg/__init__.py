"""Secure aggregation (SecAgg+ over Bonawitz et al.) for the Message API, with no Flower inside.

Modules, in data-flow order: ``encoding`` (clip-checked fixed point), ``graph`` (neighbours), ``crypto``
(thin wrappers over ``cryptography``), ``shamir`` (secret sharing), ``masks`` (mask streams and keys),
``messages`` (the wire records), ``client`` / ``server`` (the two state machines), ``inprocess`` (one round
driven in a single process, for tests and the benchmark), ``settings`` (validated configuration, the
consistency quorum, a site's own limits), ``analysis`` (who can learn one site's update: the threat table).
"""

from shared.secagg.client import ClientRoundState, SecAggClient
from shared.secagg.encoding import FixedPoint
from shared.secagg.errors import SecAggAbort, SecAggError, SecAggMessageError, SecAggProtocolError
from shared.secagg.messages import RoundParams
from shared.secagg.server import SecAggResult, SecAggServer
from shared.secagg.settings import ClientPolicy, SecAggSettings

__all__ = [
    "ClientPolicy",
    "ClientRoundState",
    "FixedPoint",
    "RoundParams",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggMessageError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "SecAggSettings",
]
