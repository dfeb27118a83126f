"""The one-run empirical audit (Steinke, Nasr, Jagielski 2023) on synthetic scores with known privacy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shared.audit.canary import (
    CanaryError,
    epsilon_lower_bound,
    make_canaries,
    one_run_audit,
    p_value,
    site_canary_rows,
)

DELTA = 1e-5
M = 1000


def _membership(seed: int, m: int = M) -> np.ndarray:
    return np.random.default_rng(seed).random(m) < 0.5


def _randomized_response_scores(included: np.ndarray, epsilon: float, seed: int) -> np.ndarray:
    """Scores of an exactly epsilon-DP mechanism per canary: the truth, flipped w.p. 1 / (1 + e^epsilon)."""
    rng = np.random.default_rng(seed)
    keep = rng.random(len(included)) < math.exp(epsilon) / (1 + math.exp(epsilon))
    return np.where(keep, included, ~included).astype(float) + 1e-6 * rng.random(len(included))


# -- canaries


def test_canaries_are_reproducible_from_the_seed():
    assert make_canaries(20, num_sites=3, num_labels=2, seed=7) == make_canaries(20, num_sites=3, num_labels=2, seed=7)


def test_canaries_differ_with_the_seed():
    assert make_canaries(20, num_sites=3, num_labels=2, seed=7) != make_canaries(20, num_sites=3, num_labels=2, seed=8)


def test_each_canary_is_included_with_probability_one_half_at_a_random_site():
    canaries = make_canaries(2000, num_sites=4, num_labels=3, seed=1)

    included = sum(c.included for c in canaries)
    sites = np.bincount([c.site for c in canaries], minlength=4)
    labels = np.bincount([c.label for c in canaries], minlength=3)

    assert stats.binomtest(included, 2000, 0.5).pvalue > 0.001
    assert stats.chisquare(sites).pvalue > 0.001 and stats.chisquare(labels).pvalue > 0.001


def test_a_site_gets_only_its_included_canaries():
    canaries = make_canaries(50, num_sites=3, num_labels=2, seed=3)

    rows = site_canary_rows(canaries, 1)

    assert rows == [(c.text, c.label) for c in canaries if c.site == 1 and c.included]
    assert len({c.text for c in canaries}) == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 0}, "canaries must be a positive integer, got 0"),
        ({"num_sites": 0}, "num_sites must be >= 1, got 0"),
        ({"num_labels": 1}, "num_labels must be >= 2, got 1"),
    ],
)
def test_bad_canary_parameters_are_errors(kwargs, message):
    args = {"m": 10, "num_sites": 2, "num_labels": 2, "seed": 0} | kwargs
    m = args.pop("m")

    with pytest.raises(CanaryError, match=message):
        make_canaries(m, **args)


# -- the bound


def test_p_value_with_delta_zero_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))

    assert p_value(100, 50, 40, epsilon=1.0, delta=0.0) == pytest.approx(stats.binom.sf(39, 50, q))


def test_p_value_grows_with_epsilon_and_delta():
    assert p_value(100, 50, 40, epsilon=0.5, delta=0) < p_value(100, 50, 40, epsilon=1.5, delta=0)
    assert p_value(100, 50, 40, epsilon=1.0, delta=0) < p_value(100, 50, 40, epsilon=1.0, delta=1e-3)


def test_bound_is_where_the_p_value_crosses_the_significance():
    eps = epsilon_lower_bound(1000, 200, 180, delta=DELTA, significance=0.05)

    assert p_value(1000, 200, 180, epsilon=eps, delta=DELTA) <= 0.05
    assert p_value(1000, 200, 180, epsilon=eps + 1e-3, delta=DELTA) > 0.05


def test_perfectly_separated_scores_give_a_bound_above_one():
    included = _membership(0)

    audit = one_run_audit(included.astype(float), included, delta=DELTA)

    assert audit.epsilon_lower > 4.0
    assert audit.correct == audit.guesses


@pytest.mark.parametrize("seed", range(5))
def test_random_scores_give_a_bound_near_zero(seed):
    included = _membership(seed)
    scores = np.random.default_rng(100 + seed).normal(size=M)

    assert one_run_audit(scores, included, delta=DELTA).epsilon_lower < 0.2


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
def test_bound_stays_below_the_epsilon_of_an_epsilon_dp_mechanism(epsilon):
    included = _membership(1)

    audit = one_run_audit(_randomized_response_scores(included, epsilon, seed=2), included, delta=DELTA)

    assert audit.epsilon_lower <= epsilon
    assert audit.epsilon_lower > 0.5 * epsilon  # and the audit is not toothless against it


def test_bound_from_many_dp_runs_exceeds_the_claim_at_most_at_the_confidence_level():
    included = _membership(3, m=200)
    over = sum(
        one_run_audit(_randomized_response_scores(included, 1.0, seed=s), included, delta=DELTA).epsilon_lower > 1.0
        for s in range(100)
    )

    assert over <= 5 + 5  # 5% of 100, plus slack for the binomial spread (Bonferroni makes it rarer still)


def test_a_mechanism_weaker_than_claimed_is_caught():
    included = _membership(4)

    audit = one_run_audit(_randomized_response_scores(included, 4.0, seed=5), included, delta=DELTA)

    assert audit.epsilon_lower > 1.0  # a claim of epsilon = 1 is refuted


def test_ties_are_broken_without_looking_at_the_index():
    included = np.array([True] * 50 + [False] * 50)  # a tie-break by index would "guess" perfectly

    assert one_run_audit(np.zeros(100), included, delta=DELTA).epsilon_lower == 0.0


@pytest.mark.parametrize(
    ("scores", "included", "kwargs", "message"),
    [
        ([1.0, 2.0], [True], {}, "equal in length"),
        ([1.0, math.nan], [True, False], {}, "scores must be finite"),
        ([1.0, 2.0], [True, False], {"confidence": 1.0}, r"confidence must be in \(0, 1\), got 1.0"),
        ([1.0, 2.0], [True, False], {"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
        ([1.0], [True], {}, "need at least 2 canaries, got 1"),
        ([1.0, 2.0], [True, False], {"choices": [(2, 1)]}, r"\(k\+, k-\) = \(2, 1\) must be"),
    ],
)
def test_bad_audit_inputs_are_errors(scores, included, kwargs, message):
    with pytest.raises(CanaryError, match=message):
        one_run_audit(scores, included, **({"delta": DELTA} | kwargs))
