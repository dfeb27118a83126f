"""Shamir sharing over GF(2^127 - 1): reconstruction, pinned values, and every bad input."""

from __future__ import annotations

import itertools
import os

import pytest

from shared.secagg import shamir
from shared.secagg.shamir import PRIME, ShamirError, Share, combine, split


def test_any_threshold_subset_reconstructs_a_32_byte_secret() -> None:
    secret = os.urandom(32)
    shares = split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares.values(), 3):
        assert combine(list(subset), threshold=3) == secret


def test_secrets_of_awkward_lengths_roundtrip() -> None:
    for n in (0, 1, 14, 15, 16, 30, 31, 33, 100):
        secret = os.urandom(n)
        shares = split(secret, threshold=2, xs=[7, 9])
        assert combine(list(shares.values()), threshold=2) == secret


def test_leading_zero_bytes_survive() -> None:
    secret = b"\x00\x00\x01" + b"\x00" * 29
    assert combine(list(split(secret, threshold=2, xs=[1, 2]).values()), threshold=2) == secret


def test_combine_interpolates_a_hand_built_polynomial() -> None:
    # f(x) = 5 + 3x + 2x^2 over the field: f(1) = 10, f(2) = 19, f(4) = 49; the secret is the 1-byte chunk 5
    shares = [Share(x=x, ys=(shamir._evaluate([5, 3, 2], x),), secret_len=1) for x in (1, 2, 4)]
    assert [s.ys[0] for s in shares] == [10, 19, 49]
    assert combine(shares, threshold=3) == b"\x05"


def test_combine_works_with_negative_differences_mod_p() -> None:
    # f(x) = 1 + (p - 1) x, i.e. 1 - x: f(3) = p - 2, f(5) = p - 4
    shares = [Share(x=3, ys=(PRIME - 2,), secret_len=1), Share(x=5, ys=(PRIME - 4,), secret_len=1)]
    assert combine(shares, threshold=2) == b"\x01"


def test_too_few_shares_are_refused() -> None:
    shares = split(os.urandom(32), threshold=3, xs=[1, 2, 3])
    with pytest.raises(ShamirError, match="need 3 shares with distinct x to reconstruct, got 2"):
        combine([shares[1], shares[2]], threshold=3)


def test_threshold_minus_one_shares_give_a_wrong_secret() -> None:
    secret = os.urandom(32)
    shares = split(secret, threshold=3, xs=[1, 2, 3])
    try:
        rebuilt = combine([shares[1], shares[2]], threshold=2)
    except ShamirError:  # the interpolated chunks do not even fit: equally a failure to learn the secret
        return
    assert rebuilt != secret


def test_one_share_is_independent_of_the_secret() -> None:
    # With t = 2, y = s + a*x with a uniform: the top bit of y is a fair coin whatever the secret.
    ones = sum(split(b"\x00" * 15, threshold=2, xs=[1, 2])[1].ys[0] >> 126 for _ in range(2000))
    assert 850 < ones < 1150


def test_share_bytes_roundtrip() -> None:
    share = split(os.urandom(32), threshold=2, xs=[3, 4])[3]
    assert Share.from_bytes(share.to_bytes()) == share
    assert len(share.to_bytes()) == 4 + 2 + 3 * 16


def test_share_from_bytes_rejects_a_wrong_length() -> None:
    raw = split(os.urandom(32), threshold=2, xs=[3, 4])[3].to_bytes()
    with pytest.raises(ShamirError, match="must carry 48 bytes of y values, got 47"):
        Share.from_bytes(raw[:-1])


def test_share_from_bytes_rejects_x_zero() -> None:
    raw = bytes(4) + (1).to_bytes(2, "big") + (1).to_bytes(16, "big")
    with pytest.raises(ShamirError, match="x = 0"):
        Share.from_bytes(raw)


def test_split_rejects_duplicate_x() -> None:
    with pytest.raises(ShamirError, match="x-coordinates must be distinct, got \\[1, 1\\]"):
        split(b"s", threshold=1, xs=[1, 1])


def test_split_rejects_x_zero() -> None:
    with pytest.raises(ShamirError, match="x-coordinates must be ints in \\[1, 2\\^32\\), got \\[0, 1\\]"):
        split(b"s", threshold=1, xs=[0, 1])


def test_split_rejects_a_threshold_above_the_holders() -> None:
    with pytest.raises(ShamirError, match="threshold must be <= the number of holders \\(2\\), got 3"):
        split(b"s", threshold=3, xs=[1, 2])


def test_split_rejects_a_zero_threshold() -> None:
    with pytest.raises(ShamirError, match="threshold must be an int >= 1, got 0"):
        split(b"s", threshold=0, xs=[1, 2])


def test_combine_rejects_conflicting_shares_for_one_x() -> None:
    a = Share(x=1, ys=(1,), secret_len=1)
    b = Share(x=1, ys=(2,), secret_len=1)
    with pytest.raises(ShamirError, match="two different shares for x = 1"):
        combine([a, b], threshold=1)


def test_combine_rejects_shares_of_different_lengths() -> None:
    a = Share(x=1, ys=(1,), secret_len=1)
    b = Share(x=2, ys=(1,), secret_len=2)
    with pytest.raises(ShamirError, match="shares disagree on the secret's length"):
        combine([a, b], threshold=2)
