"""Fixed-point encoding: the scale, no wrap-around at the worst case, unbiased rounding, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from shared.secagg.encoding import MODULUS, EncodingError, FixedPoint


def test_scale_is_the_largest_power_of_two_that_cannot_wrap() -> None:
    fp = FixedPoint.for_sum(clip_norm=5.0, max_weight=1.0, max_clients=10)
    # (2^31 - 1) / 10 - 1 = 214748363.7; / 5.00005 = 42948243 -> 2^25 (2^26 would exceed it)
    assert fp.scale == 2.0**25
    assert fp.resolution == 2.0**-25
    assert 10 * (fp.bound * fp.scale + 1) < 2**31
    assert 10 * (fp.bound * 2 * fp.scale + 1) >= 2**31


def test_worst_case_sum_of_max_clients_does_not_wrap() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=2.0, max_clients=50)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        x = np.full(8, sign * fp.bound)
        total = np.zeros(8, dtype=np.uint32)
        for _ in range(50):
            total += fp.encode(x, rng)
        decoded = fp.decode_sum(total, count=50)
        assert np.allclose(decoded, 50 * x, atol=fp.sum_error_bound(50))


def test_sum_of_random_vectors_is_within_the_quantization_bound() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=20)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.01, 0.01, size=1000) for _ in range(20)]
    total = sum(fp.encode(x, rng).astype(np.uint64) for x in xs) % MODULUS
    decoded = fp.decode_sum(total.astype(np.uint32), count=20)
    assert np.max(np.abs(decoded - sum(xs))) <= fp.sum_error_bound(20)


def test_stochastic_rounding_is_unbiased() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    value = 0.3 * fp.resolution  # a third of a unit: rounds to 0 (70%) or 1 unit (30%)
    codes = fp.encode(np.full(100_000, value), np.random.default_rng(2))
    assert set(np.unique(codes)) == {0, 1}
    assert abs(codes.mean() - 0.3) < 0.01


def test_negative_values_decode_as_negative() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    x = np.array([-0.5, -fp.resolution, 0.0, 0.25])
    assert np.array_equal(fp.decode_sum(fp.encode(x, np.random.default_rng(0)), count=1), x)


def test_encode_rejects_a_coordinate_over_the_bound() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="a coordinate of magnitude 2.0 exceeds the encoding bound"):
        fp.encode(np.array([0.1, -2.0]), np.random.default_rng(0))


def test_encode_rejects_nan() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="values must be finite"):
        fp.encode(np.array([np.nan]), np.random.default_rng(0))


def test_encode_rejects_a_matrix() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="values must be a 1-D vector, got shape \\(2, 2\\)"):
        fp.encode(np.zeros((2, 2)), np.random.default_rng(0))


def test_decode_rejects_more_clients_than_planned() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="a sum of 3 encodings exceeds max_clients = 2"):
        fp.decode_sum(np.zeros(2, dtype=np.uint32), count=3)


def test_decode_rejects_a_float_sum() -> None:
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="encoded sum must be a 1-D uint32 vector, got float64"):
        fp.decode_sum(np.zeros(2), count=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"clip_norm": 0.0, "max_weight": 1.0, "max_clients": 2},
            "clip_norm must be a finite number > 0, got 0.0",
        ),
        (
            {"clip_norm": 1.0, "max_weight": -1.0, "max_clients": 2},
            "max_weight must be a finite number > 0, got -1.0",
        ),
        ({"clip_norm": 1.0, "max_weight": 1.0, "max_clients": 0}, "max_clients must be an int >= 1, got 0"),
        ({"clip_norm": 1.0, "max_weight": 1.0, "max_clients": 2**31}, "leaves no room in a 32-bit sum"),
    ],
)
def test_for_sum_rejects_impossible_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        FixedPoint.for_sum(**kwargs)
