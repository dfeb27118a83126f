"""The f-DP one-run test (Mahloujifar, Melis and Chaudhuri 2025) on synthetic scores with known privacy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.audit.canary import CanaryError, epsilon_detectable
from shared.audit.fdp import TradeOff, audit_recorded_events, epsilon_of_events, rejects, tradeoff_of_events
from shared.distributed_dp import DiscreteGaussianDpEvent
from shared.privacy import DpEvent

DELTA = 1e-5
EVENT = DpEvent(sample_rate=0.25, noise_multiplier=0.802, steps=8, clip_norm=1.0)  # epsilon 8.0 at DELTA (PLD)
SITES = ("site-0", "site-1")


def _pure(epsilon: float) -> TradeOff:
    """The curve of epsilon-DP randomized response: one (epsilon, 0) pair."""
    return TradeOff(np.array([epsilon]), np.array([0.0]))


def _dp_sgd_scores(included: np.ndarray, *, noise: float, seed: int) -> np.ndarray:
    """Each canary's audit coordinate under EVENT's sampling, with Gaussian noise of ``noise`` per step: the
    exact DP-SGD mechanism on one coordinate per canary (scores: how far it moved towards the canary)."""
    rng = np.random.default_rng(seed)
    drawn = (rng.random((len(included), EVENT.steps)) < EVENT.sample_rate).sum(axis=1) * included
    return drawn + noise * rng.standard_normal((len(included), EVENT.steps)).sum(axis=1)


def _sites(m: int) -> list[str]:
    return [SITES[i % 2] for i in range(m)]


def test_nothing_released_is_a_coin():
    assert TradeOff(np.array([]), np.array([])).at(0.3) == pytest.approx(0.7)


def test_the_recorded_events_curve_is_their_privacy_profiles_envelope():
    f = tradeoff_of_events({"site-0": [EVENT]})

    # (epsilon, delta)-DP at the claimed point: no test has type-II error below 1 - delta - e^epsilon alpha
    assert f.at(1e-6) >= 1 - DELTA - math.exp(epsilon_of_events({"site-0": [EVENT]}, delta=DELTA)) * 1e-6 - 1e-9
    assert tradeoff_of_events({"site-0": [EVENT]}, scale=2.0).at(0.01) > f.at(0.01)  # more noise: harder to test


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_guesses_of_an_epsilon_dp_mechanism_refute_its_curve_at_most_at_the_significance(epsilon):
    rng = np.random.default_rng(0)
    refuted = 0
    for _ in range(200):
        right = rng.random(100) < math.exp(epsilon) / (1 + math.exp(epsilon))  # randomized response, 100 guesses
        refuted += rejects(_pure(epsilon), canaries=200, guesses=100, correct=int(right.sum()), significance=0.05)

    assert refuted <= 10 + 10  # 5% of 200, plus slack for the binomial spread


def test_perfect_guesses_refute_a_weak_claim_and_not_a_strong_one():
    assert rejects(_pure(2.0), canaries=1000, guesses=500, correct=500, significance=0.05)
    assert not rejects(_pure(8.0), canaries=1000, guesses=500, correct=500, significance=0.05)


def test_an_honest_dp_sgd_run_is_not_refuted_more_often_than_the_confidence_allows():
    included = np.random.default_rng(1).random(1000) < 0.5
    events = {s: [EVENT] for s in SITES}
    audits = [
        audit_recorded_events(
            _dp_sgd_scores(included, noise=EVENT.noise_multiplier, seed=s), included, _sites(1000), events, delta=DELTA
        )
        for s in range(20)
    ]

    assert sum(a.refuted for a in audits) <= 3  # 5% of 20, plus slack
    assert all(a.epsilon_lower <= a.claimed_epsilon for a in audits if not a.refuted)
    assert max(a.epsilon_lower for a in audits) > 0.5  # and the audit is not toothless against it


def test_without_noise_a_claim_of_epsilon_8_is_refuted_where_the_epsilon_delta_bound_cannot_be():
    included = np.random.default_rng(2).random(4000) < 0.5
    events = {s: [EVENT] for s in SITES}

    audit = audit_recorded_events(
        _dp_sgd_scores(included, noise=0.0, seed=3), included, _sites(4000), events, delta=DELTA
    )

    assert audit.claimed_epsilon == pytest.approx(8.0, abs=0.01)
    assert audit.refuted and audit.epsilon_lower > 8.0 and audit.epsilon_detectable >= audit.epsilon_lower
    assert epsilon_detectable(4000, delta=DELTA) < 6.0  # Steinke et al.'s bound, every guess right


def test_a_quarter_of_the_claimed_noise_is_refuted():
    included = np.random.default_rng(4).random(4000) < 0.5
    events = {s: [EVENT] for s in SITES}

    audit = audit_recorded_events(
        _dp_sgd_scores(included, noise=EVENT.noise_multiplier / 4, seed=5), included, _sites(4000), events, delta=DELTA
    )

    assert audit.refuted


def test_too_few_canaries_can_refute_nothing_and_say_so():
    included = np.random.default_rng(6).random(20) < 0.5
    events = {s: [EVENT] for s in SITES}

    audit = audit_recorded_events(included.astype(float), included, _sites(20), events, delta=DELTA)

    assert not audit.refuted and audit.epsilon_detectable < audit.claimed_epsilon


def test_a_site_that_never_trained_leaves_its_canaries_untouched_by_the_claim():
    included = np.random.default_rng(7).random(2000) < 0.5
    events = {"site-0": [EVENT], "site-1": []}

    audit = audit_recorded_events(np.zeros(2000), included, _sites(2000), events, delta=DELTA)

    assert audit.used == pytest.approx(included[::2].sum() * (1 - 0.75**8))  # only site-0's canaries could be used
    assert not audit.refuted and audit.epsilon_lower == 0.0


@pytest.mark.parametrize(
    ("sites", "events", "message"),
    [
        (["site-0"], {"site-0": [EVENT]}, "need one site per canary, got 1 sites for 2 canaries"),
        (
            list(SITES),
            {"site-0": [DpEvent(sample_rate=0.25, noise_multiplier=0.0, steps=8, clip_norm=1.0)]},
            "site 'site-0' recorded a round without noise",
        ),
        (
            list(SITES),
            {
                "site-1": [
                    DiscreteGaussianDpEvent(
                        sample_rate=0.25, steps=8, l2_sensitivity=1.0, noise_stddev=1.0, shares=3, dimension=10
                    )
                ]
            },
            "site 'site-1': the f-DP audit takes local DP-SGD events",
        ),
    ],
)
def test_bad_inputs_are_errors(sites, events, message):
    with pytest.raises(CanaryError, match=message):
        audit_recorded_events([1.0, 0.0], [True, False], sites, events, delta=DELTA)
