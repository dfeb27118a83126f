"""The centering query's public arithmetic (shared/centering.py): its event, its bound, the server's division."""

import numpy as np
import pytest

from shared.centering import (
    ANSWER_SCALE,
    answer_bound,
    center_from_sum,
    query_event,
    row_count_noise_std,
    sensitivity,
)
from shared.privacy import DpEvent


def test_the_query_is_one_gaussian_mechanism_with_sensitivity_sqrt_2_c():
    assert sensitivity(5.0) == pytest.approx(5.0 * np.sqrt(2.0))
    assert query_event(clip_norm=5.0, noise_multiplier=20.0) == DpEvent(1.0, 20.0, 1, 5.0 * np.sqrt(2.0))
    assert answer_bound(5.0) == pytest.approx(sensitivity(5.0))
    assert row_count_noise_std(noise_multiplier=20.0, sites=4) == pytest.approx(20.0 * np.sqrt(2.0) * 2.0)


def test_the_server_divides_the_summed_vector_by_the_summed_count():
    clip = 2.0
    sums = [np.array([3.0, -1.0]), np.array([5.0, 1.0])]  # two sites' sums of clipped vectors, 4 and 6 rows
    total = sum(np.append(s, clip * n) / ANSWER_SCALE for s, n in zip(sums, (4, 6), strict=True))
    center, rows = center_from_sum(total, clip_norm=clip)
    assert rows == pytest.approx(10.0)
    np.testing.assert_allclose(center, np.array([0.8, 0.0]), rtol=1e-6)  # (3 + 5, -1 + 1) / 10: the row mean
    assert center.dtype == np.float32


def test_a_non_positive_noisy_count_gives_no_center():
    center, rows = center_from_sum(np.array([1.0, 1.0, -0.5]) / ANSWER_SCALE, clip_norm=1.0)
    assert center is None and rows == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "total, message",
    [
        (np.array([1.0]), r"a centering sum is a vector of the hidden size \+ 1, got shape \(1,\)"),
        (np.array([1.0, np.nan, 2.0]), "the centering sum has non-finite values"),
    ],
)
def test_a_malformed_centering_sum_is_a_clear_error(total, message):
    with pytest.raises(ValueError, match=message):
        center_from_sum(total, clip_norm=1.0)


def test_a_non_positive_clip_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="center clip norm must be > 0, got 0.0"):
        sensitivity(0.0)
