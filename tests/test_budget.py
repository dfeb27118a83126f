"""The data holder's budget check: accept within budget, decline with a reason otherwise."""

from __future__ import annotations

import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.budget import decide
from shared.ledger import SiteLedger, keyed_fingerprint_rows
from shared.privacy import DpEvent, PrivacyError, compose_epsilon

DELTA = 1e-5
ROUND = DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0)
ONE_ROUND = compose_epsilon([ROUND], delta=DELTA, accountant="rdp")
TWO_ROUNDS = compose_epsilon([ROUND, ROUND], delta=DELTA, accountant="rdp")


def test_round_within_budget_is_accepted_with_its_epsilons():
    decision = decide([ROUND], ROUND, max_epsilon=TWO_ROUNDS + 0.01, delta=DELTA, accountant="rdp")

    assert decision.accept
    assert decision.epsilon_before == pytest.approx(ONE_ROUND)
    assert decision.epsilon_after == pytest.approx(TWO_ROUNDS)


def test_round_that_would_overspend_is_declined():
    decision = decide([ROUND], ROUND, max_epsilon=TWO_ROUNDS - 0.01, delta=DELTA, accountant="rdp")

    assert not decision.accept
    assert "declined: this round would raise epsilon from" in decision.reason
    assert decision.epsilon_after > decision.max_epsilon


def test_budget_already_spent_is_declined():
    decision = decide([ROUND, ROUND], ROUND, max_epsilon=ONE_ROUND, delta=DELTA, accountant="rdp")

    assert not decision.accept
    assert decision.reason.startswith("declined: budget already spent: epsilon")


def test_budget_smaller_than_one_round_is_declined():
    decision = decide([], ROUND, max_epsilon=ONE_ROUND / 2, delta=DELTA, accountant="rdp")

    assert not decision.accept
    assert "one round costs epsilon" in decision.reason and "more than the whole budget" in decision.reason


def test_round_without_noise_is_declined_under_a_finite_budget():
    no_noise = DpEvent(sample_rate=0.05, noise_multiplier=0.0, steps=20, clip_norm=1.0)

    decision = decide([ROUND], no_noise, max_epsilon=100.0, delta=DELTA, accountant="rdp")

    assert not decision.accept and math.isinf(decision.epsilon_after)
    assert "no noise" in decision.reason


def test_no_budget_accepts_everything():
    assert decide([ROUND] * 5, ROUND, max_epsilon=math.inf, delta=DELTA, accountant="rdp").accept


def test_budget_holds_across_runs_through_the_ledger(tmp_path):
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="site-0", signing_key=Ed25519PrivateKey.generate())
    fp = keyed_fingerprint_rows([("x", 0)], key=bytes(32))
    for run in ("run-a", "run-b"):
        ledger.append(
            run_id=run,
            server_round=1,
            adapter_hash="sha256:00",
            dataset_fingerprint=fp,
            event=ROUND,
            delta=DELTA,
            accountant="rdp",
        )

    decision = decide(ledger.history("default"), ROUND, max_epsilon=TWO_ROUNDS + 0.01, delta=DELTA, accountant="rdp")

    assert not decision.accept
    assert decision.epsilon_before == pytest.approx(TWO_ROUNDS)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 2.0])
def test_delta_outside_0_1_is_an_error(delta):
    with pytest.raises(PrivacyError, match=rf"delta must be in \(0, 1\), got {delta}"):
        decide([], ROUND, max_epsilon=1.0, delta=delta, accountant="rdp")


@pytest.mark.parametrize("max_epsilon", [0.0, -1.0])
def test_non_positive_budget_is_an_error(max_epsilon):
    with pytest.raises(PrivacyError, match=rf"max_epsilon must be > 0 \(inf for no budget\), got {max_epsilon}"):
        decide([], ROUND, max_epsilon=max_epsilon, delta=DELTA, accountant="rdp")


def test_unknown_accountant_is_an_error():
    with pytest.raises(PrivacyError, match="accountant must be one of"):
        decide([], ROUND, max_epsilon=1.0, delta=DELTA, accountant="moments")


def test_calibration_leaves_room_for_the_events_before_training():
    from shared.privacy import calibrate_noise_multiplier

    query = DpEvent(1.0, 5.0, 1, 5.0)  # a full-data Gaussian query (the feature centering, noisier than its default)
    plain = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=20)
    with_query = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=20, prior=(query,))
    assert with_query > plain
    spent = compose_epsilon([query, DpEvent(0.1, with_query, 20, 1.0)], delta=1e-5)
    assert 2.0 * 0.98 <= spent <= 2.0
    with pytest.raises(PrivacyError, match="alone spend epsilon"):
        calibrate_noise_multiplier(
            target_epsilon=0.1, delta=1e-5, sample_rate=0.1, steps=20, prior=(DpEvent(1.0, 5.0, 1, 5.0),)
        )
