"""The noisy counts a site releases on evaluation: the right mechanism, from a secure source."""

from __future__ import annotations

import numpy as np
import pytest

from client.evaluation import (
    confusion_counts,
    evaluation_event,
    noisy_counts,
    released_metrics,
    secure_standard_normal,
)
from shared.privacy import DpEvent, compose_epsilon


def test_confusion_counts_count_each_row_in_exactly_one_cell():
    counts = confusion_counts(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), num_classes=2)

    np.testing.assert_array_equal(counts, [[1, 1], [1, 2]])
    assert counts.sum() == 5  # one row more or less changes one cell by one: L2 sensitivity 1


def test_secure_normals_are_standard_normal_and_never_repeat():
    draws = secure_standard_normal(40_001)

    assert draws.shape == (40_001,) and np.isfinite(draws).all()
    assert abs(draws.mean()) < 0.03 and abs(draws.std() - 1.0) < 0.03
    assert abs(np.mean(np.abs(draws) < 1.0) - 0.6827) < 0.01
    assert not np.array_equal(secure_standard_normal(8), secure_standard_normal(8))


def test_noisy_counts_carry_noise_of_the_given_std():
    counts = np.full((100, 100), 50, dtype=np.int64)

    noisy = noisy_counts(counts, noise_multiplier=4.0)

    assert abs((noisy - counts).std() - 4.0) < 0.15
    with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0, got 0.0"):
        noisy_counts(counts, noise_multiplier=0.0)


def test_the_evaluation_is_accounted_as_a_gaussian_query_over_all_rows():
    event = evaluation_event(20.0)

    assert event == DpEvent(sample_rate=1.0, noise_multiplier=20.0, steps=1, clip_norm=1.0)
    assert compose_epsilon([event], delta=1e-5) == pytest.approx(0.16, abs=0.01)


def test_released_metrics_are_computed_from_the_noisy_counts_only():
    metrics = released_metrics(np.array([[40.5, 9.5], [10.0, 40.0]]))

    assert metrics == {"confusion-matrix": [40.5, 9.5, 10.0, 40.0], "accuracy": 0.805, "num-examples": 100}
    assert released_metrics(np.array([[-3.0, 1.0], [0.5, -2.0]]))["num-examples"] == 0
