"""An independent accountant for cross-checks: Google's dp-accounting PLD, on the same DP events.

Opacus's PRV and RDP accountants compute the number the ledger records; this one is a different
implementation (privacy loss distributions) by different authors, so agreement between them is evidence that
the recorded epsilon is right, not only that it was recomputed by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from shared.privacy import DpEvent, check_delta, coalesce

PLD_DISCRETIZATION = 1e-3  # dp-accounting's value_discretization_interval; its pessimistic estimate


def pld_epsilon(events: Iterable[DpEvent], *, delta: float, discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of the composition of Poisson-sampled Gaussian ``events``, (dp-accounting PLD)."""
    check_delta(delta)
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError as missing:
        raise ImportError("the PLD cross-check needs dp-accounting: pip install 'dp-accounting>=0.4'") from missing
    steps = [e for e in coalesce(events) if e.steps > 0]
    if not steps:
        return 0.0
    if any(e.noise_multiplier == 0.0 for e in steps):
        return math.inf
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    for e in steps:
        mechanism = dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier))
        accountant.compose(mechanism, e.steps)
    return float(accountant.get_epsilon(delta))
