"""Differential-privacy events and their accounting, kept as plain data.

Each round a site trains in is one :class:`DpEvent`: Poisson-sampled Gaussian DP-SGD with a sample rate, a noise
multiplier and a number of steps. Epsilon is always recomputed by composing the list of events with a fresh
Opacus accountant, so it survives restarts (the events live in the site's ledger) and anyone can re-account it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Literal

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")


class PrivacyError(ValueError):
    """Invalid DP parameters or an impossible privacy request."""


@dataclass(frozen=True)
class DpEvent:
    """One round of Poisson-sampled DP-SGD at one site.

    ``sample_rate`` is the Poisson probability of each record being in a batch, ``steps`` the number of
    noisy steps taken in the round, ``noise_multiplier`` the Gaussian noise std divided by ``clip_norm``.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    sampling: str = "poisson"

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.noise_multiplier >= 0.0 or math.isinf(self.noise_multiplier):
            raise PrivacyError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise PrivacyError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not self.clip_norm > 0.0:
            raise PrivacyError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.sampling != "poisson":
            # Opacus accounts every sampler as Poisson; a fixed-size batch would need another analysis.
            raise PrivacyError(f"only Poisson sampling is accounted, got sampling={self.sampling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DpEvent:
        expected = {"sample_rate", "noise_multiplier", "steps", "clip_norm", "sampling"}
        missing = {"sample_rate", "noise_multiplier", "steps", "clip_norm"} - raw.keys()
        if missing:
            raise PrivacyError(f"DP event is missing {sorted(missing)}: {raw}")
        unknown = raw.keys() - expected
        if unknown:
            raise PrivacyError(f"DP event has unknown keys {sorted(unknown)}: {raw}")
        return cls(
            sample_rate=float(raw["sample_rate"]),
            noise_multiplier=float(raw["noise_multiplier"]),
            steps=int(raw["steps"]),
            clip_norm=float(raw["clip_norm"]),
            sampling=str(raw.get("sampling", "poisson")),
        )


def check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _opacus_accountant(accountant: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if accountant == "prv" else RDPAccountant()


def coalesce(events: Iterable[DpEvent]) -> list[DpEvent]:
    """Events of the same mechanism (sample rate, noise multiplier) merged, their steps summed.

    Composition is commutative, so epsilon is unchanged, and PRV is far faster with one entry per distinct
    mechanism than with one per round.
    """
    merged: dict[tuple[float, float, str], DpEvent] = {}
    for e in events:
        key = (e.sample_rate, e.noise_multiplier, e.sampling)
        prior = merged.get(key)
        merged[key] = e if prior is None else replace(prior, steps=prior.steps + e.steps)
    return list(merged.values())


PRV_EPS_ERROR = 1e-3  # Opacus's default (0.01) is an absolute error: over 1% of any epsilon below 1


def compose_epsilon(
    events: Iterable[DpEvent], *, delta: float, accountant: str = "prv", eps_error: float = PRV_EPS_ERROR
) -> float:
    """Epsilon at ``delta`` of the adaptive composition of ``events`` (0.0 for no steps, inf for no noise).

    PRV is asked for an epsilon within ``eps_error`` (absolute) of the exact one, so that it agrees with an
    independent PLD accountant to well under 1% (tests/test_audit_accounting.py).
    """
    check_delta(delta)
    check_accountant(accountant)
    steps = [e for e in coalesce(events) if e.steps > 0]
    if not steps:
        return 0.0
    if any(e.noise_multiplier == 0.0 for e in steps):
        return math.inf
    mechanisms = tuple(sorted((e.noise_multiplier, e.sample_rate, e.steps) for e in steps))
    return _accountant_epsilon(mechanisms, delta, accountant, eps_error)


@lru_cache(maxsize=256)  # pure and slow (PRV): a round's budget check and its ledger entry ask the same question
def _accountant_epsilon(
    mechanisms: tuple[tuple[float, float, int], ...], delta: float, accountant: str, eps_error: float
) -> float:
    import numpy as np

    acc = _opacus_accountant(accountant)
    acc.history = list(mechanisms)
    if accountant == "prv":
        with np.errstate(divide="ignore"):  # a sample rate of 1 (a full-data query) takes log(1 - q) = -inf
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
    with warnings.catch_warnings():
        # a very noisy full-data query (the centering query) has its best RDP order above Opacus's largest:
        # the epsilon is still a valid upper bound, only not the tightest RDP can give
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=64)  # a pure function of public numbers, and slow (PRV): same inputs, same answer
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = 0.005,
    prior: tuple[DpEvent, ...] = (),
) -> float:
    """The smallest noise multiplier (to within ``tolerance``, relative) whose ``steps`` Poisson-sampled steps,
    composed with the ``prior`` events (the feature-centering query), spend at most ``target_epsilon``:
    bisection on the accountant's epsilon, bracketed by the fast RDP answer (PRV is tighter than RDP, so its
    answer is never above RDP's)."""
    check_delta(delta)
    check_accountant(accountant)
    if not target_epsilon > 0.0 or math.isinf(target_epsilon):
        raise PrivacyError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    if steps <= 0:
        raise PrivacyError(f"steps must be > 0 to calibrate noise, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate}")

    def eps(sigma: float, acc: str, eps_error: float = 0.01) -> float:
        event = DpEvent(sample_rate, sigma, steps, 1.0)
        return compose_epsilon([*prior, event], delta=delta, accountant=acc, eps_error=eps_error)

    spent = compose_epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the events before training ({list(prior)}) alone spend epsilon {spent:.4f} >= target {target_epsilon}"
        )

    high = 1.0
    while eps(high, "rdp") > target_epsilon:
        high *= 2.0
        if high > 1e4:
            raise PrivacyError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps")
    low = high / 2.0
    while low > 1e-3 and eps(low, "rdp") <= target_epsilon:
        low /= 2.0
    # RDP bracket [low, high] with eps_rdp(low) > target >= eps_rdp(high); refine on the chosen accountant
    if accountant == "prv":  # PRV's answer is at most RDP's, usually within 20%; PRV is slow at tiny sigma
        low = 0.8 * high
        while low > 1e-3 and eps(low, "prv") <= target_epsilon:
            low *= 0.8
    while (high - low) / high > tolerance:
        mid = (low + high) / 2.0
        if eps(mid, accountant) <= target_epsilon:
            high = mid
        else:
            low = mid
    while eps(high, accountant, PRV_EPS_ERROR) > target_epsilon:  # the bisection used a coarser PRV: re-check
        high *= 1.0 + tolerance
    return high


def epsilon_after(history: Sequence[DpEvent], planned: DpEvent, *, delta: float, accountant: str = "prv") -> float:
    """Epsilon the site would have spent after ``planned`` on top of ``history``: the budget check's number."""
    return compose_epsilon([*history, planned], delta=delta, accountant=accountant)
