"""The data holder's budget check: before training a round, would the site's epsilon stay within its budget?

The decision is the site's own: ``max_epsilon``, ``delta`` and the accountant come from the site's config
(never from the run config), the history from its own ledger (every release of the same data source, in every
run, whatever the rows' fingerprint). A round that would overspend is declined with an explicit reason, which
the client sends back instead of an update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.distributed_dp import AnyDpEvent, DiscreteGaussianDpEvent
from shared.ledger import cumulative_epsilon
from shared.privacy import DpEvent, PrivacyError, check_accountant, check_delta


@dataclass(frozen=True)
class BudgetDecision:
    """Whether to train the planned round, and the numbers behind the answer."""

    accept: bool
    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    reason: str


def check_max_epsilon(max_epsilon: float) -> None:
    if isinstance(max_epsilon, bool) or not isinstance(max_epsilon, (int, float)) or not max_epsilon > 0.0:
        raise PrivacyError(f"max_epsilon must be > 0 (inf for no budget), got {max_epsilon!r}")


def decide(
    history: Sequence[AnyDpEvent], planned: AnyDpEvent, *, max_epsilon: float, delta: float, accountant: str
) -> BudgetDecision:
    """Accept ``planned`` only if the epsilon after it, composed with ``history``, is at most ``max_epsilon``.

    Raises :class:`PrivacyError` for an invalid budget, delta or accountant (a configuration error, not a
    decline). A round without steps costs nothing and is always accepted.
    """
    check_max_epsilon(max_epsilon)
    check_delta(delta)
    check_accountant(accountant)
    if not isinstance(planned, (DpEvent, DiscreteGaussianDpEvent)):
        raise PrivacyError(f"planned must be a DpEvent or DiscreteGaussianDpEvent, got {type(planned).__name__}")
    before = cumulative_epsilon(history, delta=delta, accountant=accountant)
    after = cumulative_epsilon([*history, planned], delta=delta, accountant=accountant)
    budget = f"max_epsilon={max_epsilon:g} at delta={delta:g} ({accountant})"
    if after <= max_epsilon:
        return BudgetDecision(
            True, before, after, max_epsilon, f"epsilon {_fmt(before)} -> {_fmt(after)} within {budget}"
        )
    if before >= max_epsilon:
        reason = f"budget already spent: epsilon {_fmt(before)} >= {budget}"
    elif not history:
        reason = f"one round costs epsilon {_fmt(after)}, more than the whole budget {budget}"
    elif math.isinf(after):
        reason = f"the planned round has no noise (noise_multiplier=0): epsilon would be inf > {budget}"
    else:
        reason = f"this round would raise epsilon from {_fmt(before)} to {_fmt(after)}, over {budget}"
    return BudgetDecision(False, before, after, max_epsilon, f"declined: {reason}")


def _fmt(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:.4f}"
