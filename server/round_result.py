"""What one round of aggregation yields, whichever aggregator (plain or secure) produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RoundAggregate:
    """The SUM of the surviving clients' clipped, weighted updates, and who took part.

    ``total`` is ``None`` when the round was aborted or nobody contributed; nothing is revealed then.
    ``client_metrics`` and ``dp_events`` are keyed by node id and hold only what each client reports in the
    clear (cumulative epsilon, train loss, its DP event), never its update.
    """

    total: np.ndarray | None
    total_weight: float
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)
    aborted: bool = False
    abort_reason: str | None = None
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    dp_events: dict[int, dict[str, Any]] = field(default_factory=dict)
    site_ids: dict[int, str] = field(default_factory=dict)
    decline_reasons: dict[int, str] = field(default_factory=dict)
    attestations: dict[int, dict[str, Any]] = field(default_factory=dict)
