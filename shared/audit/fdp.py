"""One-run audit of the recorded DP-SGD as an f-DP claim (Mahloujifar, Melis and Chaudhuri, *Auditing
f-Differential Privacy in One Run*, ICML 2025).

Why: Steinke, Nasr and Jagielski's bound (:mod:`shared.audit.canary`) tests one (epsilon, delta) pair, and its
delta term grows with the number of canaries (``2 m delta``): at delta 1e-5 and 95% confidence it never exceeds
about 5.9, however many canaries and however good the guesses, so a run claiming epsilon 8 cannot be refuted
by it. A site's ledger records more than a pair: the mechanism itself (Poisson rate, noise multiplier and steps
of every release). Its whole trade-off curve ``f`` (Dong, Roth and Su 2019: the smallest type-II error of any
test of "canary in" against "canary out" at each type-I error) follows from the privacy loss distribution, and
the f-DP one-run test holds the guesses to that curve, with no additive delta term.

The test. ``m`` canaries, each in the training independently with probability 1/2; the auditor makes ``g``
guesses ("in" for the highest scores, "out" for the lowest) and ``c`` are right. If the training is f-DP with
respect to each canary (``f`` symmetric), the probability of ``c`` or more right is below ``tau`` whenever this
recursion (the paper's bound with abstentions, two choices per canary) ends above ``g / m``:

    r = tau c / m,  h = tau (g - c) / m
    for i = c - 1, ..., 0:   h' = max(h, f(1 - r)),  r = r + i / (g - i) * (h' - h),  h = h'
    the claim is refuted at significance tau  iff  r + h > g / m

(``f(1 - y)`` is the inverse of the blow-up ``x -> 1 - f(x)`` of a symmetric curve.)

The curve. Each canary site's DP events of the run are composed with dp-accounting's privacy loss
distributions (add-or-remove neighbours, both directions; pessimistic discretization, so the ``delta(epsilon)``
used is an upper bound and the test errs towards passing), and ``f(alpha)`` is the envelope, over a grid of
epsilons, of ``max(0, 1 - delta(eps) - e^eps alpha, e^-eps (1 - delta(eps) - alpha))`` with ``delta(eps)`` the
largest of the sites'. A coarser grid or discretization gives a smaller ``f``: a weaker claim, never a false
refutation.

What is reported (:func:`audit_recorded_events`):

- ``refuted``: the recorded events' own curve is rejected: the training was less private than its ledgers say.
- ``epsilon_lower``: the largest epsilon, at the audit's delta, of the recorded events with every noise
  multiplier scaled by a common factor, that the guesses refute (0 when none). The refutations are nested (more
  noise, a stronger claim, easier to refute), so this holds with the same confidence; it exceeds the claimed
  epsilon exactly when the claim is refuted.
- ``epsilon_detectable``: the same with every guess right, among the one-sided guesses no larger than the number
  of inserted canaries that training can have used (a canary never drawn into a batch leaves no trace): the most
  this audit can show at these settings. A claim above it cannot be refuted by it, whatever went wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from shared.audit.canary import DEFAULT_CONFIDENCE, CanaryError, check_scores, correct_guesses, k_choices
from shared.privacy import DpEvent, coalesce

# the epsilons whose (epsilon, delta(epsilon)) pairs make the curve: finer where DP-SGD claims live
EPSILON_GRID = np.concatenate([np.arange(0.0, 20.0, 0.25), np.arange(20.0, 100.0 + 1e-9, 2.0)])
PLD_DISCRETIZATION = 1e-2  # dp-accounting's value_discretization_interval: pessimistic, 5-10x faster than 1e-3
MIN_NOISE = 0.2  # the family's smallest noise multiplier (its PLD gets slow below; epsilon ~100 at rate 0.25)
MAX_SCALE = 16.0  # the family's largest noise scale (epsilon near 0)
SCALE_LADDER = 64  # the family's scales are 2^(k / 64): noise multipliers 1% apart


@dataclass(frozen=True)
class TradeOff:
    """A symmetric trade-off curve, as the privacy profile ``(epsilons[i], deltas[i])`` it is the envelope of."""

    epsilons: np.ndarray
    deltas: np.ndarray

    def __post_init__(self) -> None:
        if self.epsilons.shape != self.deltas.shape or self.epsilons.ndim != 1:
            raise CanaryError(
                "epsilons and deltas must be 1-D and equal in length, "
                f"got {self.epsilons.shape} and {self.deltas.shape}"
            )

    def at(self, alpha: float) -> float:
        """The smallest type-II error of any test of "in" against "out" whose type-I error is ``alpha``."""
        if self.epsilons.size == 0:
            return 1.0 - alpha  # nothing released: no test beats a coin
        gap = 1.0 - self.deltas
        best = np.maximum(gap - np.exp(self.epsilons) * alpha, np.exp(-self.epsilons) * (gap - alpha))
        return float(max(0.0, best.max()))


def rejects(f: TradeOff, *, canaries: int, guesses: int, correct: int, significance: float) -> bool:
    """Whether ``correct`` right out of ``guesses`` guesses (of ``canaries``) refute f-DP at ``significance``."""
    if not 0 <= correct <= guesses <= canaries:
        raise CanaryError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    if not 0.0 < significance < 1.0:
        raise CanaryError(f"significance must be in (0, 1), got {significance}")
    r = significance * correct / canaries
    h = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        raised = max(h, f.at(1.0 - r))
        if raised == h:  # h no longer grows, so neither does r
            break
        r = min(r + i / (guesses - i) * (raised - h), 1.0)
        h = raised
    return r + h > guesses / canaries


# -- the recorded events' curve ----------------------------------------------------------------------------


Mechanisms = tuple[tuple[float, float, int], ...]  # (sample rate, noise multiplier, steps), one per mechanism


def _mechanisms(events: Sequence[DpEvent], scale: float) -> Mechanisms:
    return tuple(sorted((e.sample_rate, e.noise_multiplier * scale, e.steps) for e in coalesce(events) if e.steps > 0))


@lru_cache(maxsize=256)  # pure and the slow part: a search asks for the same sites at many scales
def _pld(mechanisms: Mechanisms) -> Any:
    try:
        from dp_accounting.pld import privacy_loss_distribution as pld
    except ImportError as missing:
        raise ImportError("the canary audit needs dp-accounting: pip install 'dp-accounting>=0.4'") from missing
    composed = None
    for sample_rate, noise_multiplier, steps in mechanisms:
        one = pld.from_gaussian_mechanism(
            standard_deviation=noise_multiplier,
            sensitivity=1.0,
            sampling_prob=sample_rate,
            value_discretization_interval=PLD_DISCRETIZATION,
        ).self_compose(steps)
        composed = one if composed is None else composed.compose(one)
    return composed


@lru_cache(maxsize=256)
def _deltas(mechanisms: Mechanisms) -> np.ndarray:
    deltas = np.asarray(_pld(mechanisms).get_delta_for_epsilon(EPSILON_GRID), dtype=np.float64)
    deltas.flags.writeable = False  # shared by the cache
    return deltas


def _check_events(events_by_site: Mapping[str, Sequence[DpEvent]]) -> None:
    for site, events in events_by_site.items():
        for e in events:
            if not isinstance(e, DpEvent):
                raise CanaryError(f"site {site!r}: the f-DP audit takes local DP-SGD events, got {e!r}")
            if e.steps > 0 and e.noise_multiplier == 0.0:
                raise CanaryError(f"site {site!r} recorded a round without noise: its claim is epsilon = inf")


def tradeoff_of_events(events_by_site: Mapping[str, Sequence[DpEvent]], *, scale: float = 1.0) -> TradeOff:
    """The curve every site's events (noise multipliers times ``scale``) satisfy: the envelope of the largest
    ``delta(epsilon)`` of any site."""
    _check_events(events_by_site)
    deltas = np.zeros_like(EPSILON_GRID)
    for events in events_by_site.values():
        mechanisms = _mechanisms(events, scale)
        if mechanisms:
            deltas = np.maximum(deltas, _deltas(mechanisms))
    return TradeOff(EPSILON_GRID, np.clip(deltas, 0.0, 1.0))


def epsilon_of_events(events_by_site: Mapping[str, Sequence[DpEvent]], *, delta: float, scale: float = 1.0) -> float:
    """The largest epsilon at ``delta`` of any site's events (noise multipliers times ``scale``), by PLD."""
    _check_events(events_by_site)
    epsilons = [
        float(_pld(m).get_epsilon_for_delta(delta))
        for m in (_mechanisms(events, scale) for events in events_by_site.values())
        if m
    ]
    return max(epsilons, default=0.0)


def used_canaries(included: np.ndarray, sites: Sequence[str], events_by_site: Mapping[str, Sequence[DpEvent]]) -> float:
    """The expected number of inserted canaries that training drew into a batch at least once: the most that
    any guess can be better than a coin on."""
    never = {s: math.prod((1.0 - e.sample_rate) ** e.steps for e in events_by_site.get(s, ())) for s in set(sites)}
    return float(sum(1.0 - never[s] for s, inside in zip(sites, included, strict=True) if inside))


# -- the audit ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimAudit:
    """The f-DP one-run audit of a run's recorded events (see the module docstring for each number)."""

    refuted: bool
    claimed_epsilon: float
    epsilon_lower: float
    epsilon_detectable: float
    confidence: float
    delta: float
    canaries: int
    included: int
    used: float  # expected inserted canaries drawn into a batch at least once
    k_plus: int  # the guesses shown: the (k+, k-) whose accuracy is furthest above a coin's
    k_minus: int
    guesses: int
    correct: int
    choices: int  # (k+, k-) pairs tried; the confidence was split among them
    method: str = "f-DP one-run test of the recorded DP-SGD events (Mahloujifar, Melis and Chaudhuri 2025)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest_refuted(
    refuted_at: Callable[[float], bool], events_by_site: Mapping[str, Sequence[DpEvent]], *, delta: float
) -> tuple[bool, float]:
    """Whether the claim (scale 1) is refuted, and the largest epsilon of the scaled family that is (0: none).

    The family's scales are a ladder ``2^(k / SCALE_LADDER)`` from the smallest that keeps every noise
    multiplier at :data:`MIN_NOISE` or more up to :data:`MAX_SCALE`. Refutations are nested in the scale (more
    noise is a stronger claim, easier to refute), so a binary search on the ladder finds the boundary, and the
    epsilon reported is that of a scale that was itself refuted."""
    noises = [e.noise_multiplier for events in events_by_site.values() for e in events if e.steps > 0]
    if not noises:
        return False, 0.0
    lowest = math.ceil(SCALE_LADDER * math.log2(min(1.0, MIN_NOISE / min(noises))))
    ladder = [2.0 ** (k / SCALE_LADDER) for k in range(lowest, round(SCALE_LADDER * math.log2(MAX_SCALE)) + 1)]
    one = ladder.index(1.0)
    refuted = refuted_at(1.0)
    lo, hi = (-1, one) if refuted else (one, len(ladder))  # lo: not refuted (or off the ladder), hi: refuted
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if refuted_at(ladder[mid]):
            hi = mid
        else:
            lo = mid
    if hi == len(ladder):
        return False, 0.0
    return refuted, epsilon_of_events(events_by_site, delta=delta, scale=ladder[hi])


def audit_recorded_events(
    scores: Sequence[float],
    included: Sequence[bool],
    sites: Sequence[str],
    events_by_site: Mapping[str, Sequence[DpEvent]],
    *,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> ClaimAudit:
    """Audit canary ``scores`` (higher: more likely inserted) against the DP events each canary's site recorded
    for the run (``sites[i]`` is canary i's site, ``events_by_site`` its events; a site without events never
    trained its canaries)."""
    s, truth = check_scores(scores, included)
    if len(sites) != len(s):
        raise CanaryError(f"need one site per canary, got {len(sites)} sites for {len(s)} canaries")
    if not 0.0 < confidence < 1.0:
        raise CanaryError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 < delta < 1.0:
        raise CanaryError(f"delta must be in (0, 1), got {delta}")
    mine = {site: list(events_by_site.get(site, ())) for site in set(sites)}
    _check_events(mine)
    m = len(s)
    pairs = k_choices(m)
    significance = (1.0 - confidence) / len(pairs)
    counts = correct_guesses(s, truth, pairs, seed=seed)
    used = used_canaries(truth, sites, mine)
    perfect = [(kp, km) for kp, km in pairs if km == 0 and kp <= used]

    def refuted_by(observed: Sequence[tuple[tuple[int, int], int]]) -> Callable[[float], bool]:
        def refuted_at(scale: float) -> bool:
            f = tradeoff_of_events(mine, scale=scale)
            return any(
                rejects(f, canaries=m, guesses=kp + km, correct=c, significance=significance)
                for (kp, km), c in observed
            )

        return refuted_at

    observed = list(zip(pairs, counts, strict=True))
    refuted, lower = _largest_refuted(refuted_by(observed), mine, delta=delta)
    _, detectable = _largest_refuted(refuted_by([(p, p[0]) for p in perfect]), mine, delta=delta)
    claimed = epsilon_of_events(mine, delta=delta)
    # the guesses shown: those furthest above a coin's accuracy, in standard deviations
    (kp, km), correct = max(observed, key=lambda o: ((2 * o[1] - sum(o[0])) / math.sqrt(sum(o[0])), o[0]))
    return ClaimAudit(
        refuted=refuted,
        claimed_epsilon=claimed,
        epsilon_lower=lower,
        epsilon_detectable=detectable,
        confidence=confidence,
        delta=delta,
        canaries=m,
        included=int(truth.sum()),
        used=used,
        k_plus=kp,
        k_minus=km,
        guesses=kp + km,
        correct=correct,
        choices=len(pairs),
    )
