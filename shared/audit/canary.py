"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

``m`` canaries, random text with a random label, are drawn from a seeded RNG; each is assigned to one random
site and inserted into that site's training data independently with probability 1/2. After the run, each
canary gets a score from the final model (higher: looks more like a training member, e.g. the drop in its
loss). The auditor guesses "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest, and abstains on
the rest. If training is (epsilon, delta)-DP with respect to each canary, the number of correct guesses
``W`` out of ``r = k+ + k-`` satisfies (the paper's main theorem, as in its reference code):

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{i=1..v} P[v > Binomial(r, q) >= v - i] / i,
    q = e^epsilon / (1 + e^epsilon).

The empirical lower bound is the largest epsilon for which that p-value is below ``1 - confidence``: with
probability at least ``confidence``, the true epsilon is at least that large. Several (k+, k-) choices are
tried; the confidence is split among them (Bonferroni), so picking the best stays valid.

What it means: a lower bound that exceeds the claimed epsilon proves the claim wrong (a bug in the DP code or
its accounting); a lower bound far below the claim is expected (one run, a weak black-box attacker) and does
NOT show that the claim is tight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CANARY_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
CANARY_WORDS = 12  # words per canary text
DEFAULT_CONFIDENCE = 0.95
K_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)  # k as a fraction of m/2, for each guessing side


class CanaryError(ValueError):
    """Invalid canary parameters or scores."""


@dataclass(frozen=True)
class Canary:
    """One canary: its text and random label, the site it is assigned to, and whether it is inserted."""

    index: int
    text: str
    label: int
    site: int  # partition id of the site whose data it may join
    included: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_canaries(m: int, *, num_sites: int, num_labels: int, seed: int) -> list[Canary]:
    """``m`` canaries from a seeded RNG: random words, uniform label and site, each included w.p. 1/2."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise CanaryError(f"canaries must be a positive integer, got {m!r}")
    if num_sites < 1:
        raise CanaryError(f"num_sites must be >= 1, got {num_sites}")
    if num_labels < 2:
        raise CanaryError(f"num_labels must be >= 2, got {num_labels}")
    rng = np.random.default_rng([seed, 0xCA7A])
    canaries = []
    for i in range(m):
        lengths = rng.integers(3, 9, size=CANARY_WORDS)
        words = ["".join(rng.choice(list(CANARY_ALPHABET), size=int(n))) for n in lengths]
        canaries.append(
            Canary(
                index=i,
                text=" ".join(words),
                label=int(rng.integers(num_labels)),
                site=int(rng.integers(num_sites)),
                included=bool(rng.random() < 0.5),
            )
        )
    return canaries


def site_canary_rows(canaries: Sequence[Canary], site: int) -> list[tuple[str, int]]:
    """The (text, label) rows a site adds to its training data: its included canaries only."""
    return [(c.text, c.label) for c in canaries if c.site == site and c.included]


# -- the one-run bound ---------------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """P-value of ``v`` or more correct guesses out of ``r`` (of ``m`` canaries) under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise CanaryError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if not epsilon >= 0:
        raise CanaryError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise CanaryError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    between = stats.binom.sf(v - i - 1, r, q) - beta  # P[v > Bin(r, q) >= v - i]
    alpha = float(np.max(between / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, significance: float) -> float:
    """The largest epsilon that ``v`` correct out of ``r`` guesses rejects at ``significance`` (0 if none)."""
    if not 0.0 < significance < 1.0:
        raise CanaryError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, r, v, epsilon=0.0, delta=delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, epsilon=hi, delta=delta) <= significance:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # every guess right with m huge: no finite claim survives
            return math.inf
    for _ in range(60):  # bisection: p_value is increasing in epsilon
        mid = (lo + hi) / 2.0
        if p_value(m, r, v, epsilon=mid, delta=delta) <= significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit's result: the empirical lower bound and the guesses behind it."""

    epsilon_lower: float
    confidence: float
    delta: float
    canaries: int
    included: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    choices: int  # (k+, k-) pairs tried; the confidence was split among them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epsilon_detectable(
    m: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE, choices: Sequence[tuple[int, int]] | None = None
) -> float:
    """The largest lower bound :func:`one_run_audit` can give with ``m`` canaries: every guess right. Its delta
    term grows with ``m``, so at delta 1e-5 and 95% this never exceeds about 5.9, however large ``m``."""
    pairs = list(choices) if choices is not None else k_choices(m)
    significance = (1.0 - confidence) / len(pairs)
    return max(epsilon_lower_bound(m, kp + km, kp + km, delta=delta, significance=significance) for kp, km in pairs)


def k_choices(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried: symmetric guessing and "in"-only guessing at a few sizes."""
    ks = sorted({max(1, int(round(f * m / 2))) for f in K_FRACTIONS})
    return [(k, k) for k in ks] + [(k, 0) for k in ks]


def correct_guesses(
    scores: np.ndarray, included: np.ndarray, pairs: Sequence[tuple[int, int]], *, seed: int = 0
) -> list[int]:
    """For each (k+, k-): how many of the guesses "in" for the k+ highest scores and "out" for the k- lowest are
    right. Ties are broken by a seeded shuffle, never by index (an index order could carry the truth)."""
    m = len(scores)
    for kp, km in pairs:
        if kp < 0 or km < 0 or kp + km > m or kp + km == 0:
            raise CanaryError(f"(k+, k-) = ({kp}, {km}) must be non-negative with 0 < k+ + k- <= {m}")
    jitter = np.random.default_rng(seed).permutation(m)
    ranked = np.asarray(included, dtype=bool)[np.lexsort((jitter, -np.asarray(scores)))]  # highest score first
    return [int(ranked[:kp].sum()) + int((~ranked[m - km :]).sum() if km else 0) for kp, km in pairs]


def check_scores(scores: Sequence[float], included: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` and ``included`` as arrays, checked: 1-D, equal in length, finite, at least 2 canaries."""
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != truth.shape:
        raise CanaryError(f"scores and included must be 1-D and equal in length, got {s.shape} and {truth.shape}")
    if not np.all(np.isfinite(s)):
        raise CanaryError("canary scores must be finite")
    if len(s) < 2:
        raise CanaryError(f"need at least 2 canaries, got {len(s)}")
    return s, truth


def one_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    choices: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> OneRunAudit:
    """Empirical epsilon lower bound from canary ``scores`` (higher: more likely a member) and the truth."""
    s, truth = check_scores(scores, included)
    if not 0.0 < confidence < 1.0:
        raise CanaryError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 < delta < 1.0:
        raise CanaryError(f"delta must be in (0, 1), got {delta}")
    m = len(s)
    pairs = list(choices) if choices is not None else k_choices(m)
    significance = (1.0 - confidence) / len(pairs)
    best: OneRunAudit | None = None
    for (kp, km), correct in zip(pairs, correct_guesses(s, truth, pairs, seed=seed), strict=True):
        eps = epsilon_lower_bound(m, kp + km, correct, delta=delta, significance=significance)
        if best is None or eps > best.epsilon_lower:
            best = OneRunAudit(
                epsilon_lower=eps,
                confidence=confidence,
                delta=delta,
                canaries=m,
                included=int(truth.sum()),
                k_plus=kp,
                k_minus=km,
                guesses=kp + km,
                correct=correct,
                choices=len(pairs),
            )
    assert best is not None
    return best
