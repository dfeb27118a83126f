"""Shamir secret sharing of byte strings over the prime field GF(2^127 - 1).

A secret of ``L`` bytes is cut into 15-byte chunks (each < 2^120 < p, so every chunk is a field element);
each chunk is shared with its own random polynomial of degree ``threshold - 1`` and the same x-coordinates.
A share is ``(x, y_1 .. y_c)``; any ``threshold`` shares with distinct x give the secret back by Lagrange
interpolation at 0, and fewer reveal nothing about it (every candidate secret is equally likely).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**127 - 1
CHUNK_BYTES = 15
ELEMENT_BYTES = 16
_X_BYTES = 4
_LEN_BYTES = 2
MAX_SECRET_BYTES = 2**16 - 1


class ShamirError(ValueError):
    """Bad sharing parameters, malformed shares, or too few shares to reconstruct."""


@dataclass(frozen=True)
class Share:
    """One holder's share: its x-coordinate (1 .. 2^32 - 1), one y per chunk, and the secret's length."""

    x: int
    ys: tuple[int, ...]
    secret_len: int

    def to_bytes(self) -> bytes:
        return (
            self.x.to_bytes(_X_BYTES, "big")
            + self.secret_len.to_bytes(_LEN_BYTES, "big")
            + b"".join(y.to_bytes(ELEMENT_BYTES, "big") for y in self.ys)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if not isinstance(data, bytes) or len(data) < _X_BYTES + _LEN_BYTES:
            raise ShamirError(f"a share must be at least {_X_BYTES + _LEN_BYTES} bytes, got {data!r:.40}")
        x = int.from_bytes(data[:_X_BYTES], "big")
        secret_len = int.from_bytes(data[_X_BYTES : _X_BYTES + _LEN_BYTES], "big")
        body = data[_X_BYTES + _LEN_BYTES :]
        n_chunks = _n_chunks(secret_len)
        if len(body) != n_chunks * ELEMENT_BYTES:
            raise ShamirError(
                f"a share of a {secret_len}-byte secret must carry {n_chunks * ELEMENT_BYTES} bytes of y "
                f"values, "
                f"got {len(body)}"
            )
        ys = tuple(int.from_bytes(body[i * ELEMENT_BYTES : (i + 1) * ELEMENT_BYTES], "big") for i in range(n_chunks))
        if x == 0 or any(y >= PRIME for y in ys):
            raise ShamirError(f"share has x = 0 or a y value outside the field (x = {x})")
        return cls(x=x, ys=ys, secret_len=secret_len)


def _n_chunks(secret_len: int) -> int:
    return max(1, -(-secret_len // CHUNK_BYTES))


def _chunks(secret: bytes) -> list[int]:
    if not secret:
        return [0]
    return [int.from_bytes(secret[i : i + CHUNK_BYTES], "big") for i in range(0, len(secret), CHUNK_BYTES)]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner evaluation of sum_j coefficients[j] * x^j mod p."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, Share]:
    """Share ``secret`` among holders at x-coordinates ``xs`` so that any ``threshold`` of them recover it."""
    if not isinstance(secret, bytes) or len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret must be bytes of length <= {MAX_SECRET_BYTES}, got {type(secret).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold must be an int >= 1, got {threshold!r}")
    xs = list(xs)
    if len(set(xs)) != len(xs):
        raise ShamirError(f"x-coordinates must be distinct, got {xs}")
    if any(isinstance(x, bool) or not isinstance(x, int) or not 0 < x < 2 ** (8 * _X_BYTES) for x in xs):
        raise ShamirError(f"x-coordinates must be ints in [1, 2^32), got {xs}")
    if threshold > len(xs):
        raise ShamirError(f"threshold must be <= the number of holders ({len(xs)}), got {threshold}")
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in _chunks(secret)]
    return {x: Share(x=x, ys=tuple(_evaluate(p, x) for p in polys), secret_len=len(secret)) for x in xs}


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The secret from ``threshold`` shares with distinct x (with more, the lowest x are used)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold must be an int >= 1, got {threshold!r}")
    by_x: dict[int, Share] = {}
    for share in shares:
        if share.x in by_x and by_x[share.x] != share:
            raise ShamirError(f"two different shares for x = {share.x}")
        by_x[share.x] = share
    if len(by_x) < threshold:
        raise ShamirError(f"need {threshold} shares with distinct x to reconstruct, got {len(by_x)}")
    chosen = [by_x[x] for x in sorted(by_x)[:threshold]]
    lengths = {s.secret_len for s in chosen}
    if len(lengths) != 1 or any(len(s.ys) != _n_chunks(s.secret_len) for s in chosen):
        raise ShamirError(f"shares disagree on the secret's length: {sorted(lengths)}")
    secret_len = lengths.pop()
    xs = [s.x for s in chosen]
    # Lagrange basis at 0: l_j(0) = prod_{m != j} x_m / (x_m - x_j)
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        basis.append(num * pow(den, -1, PRIME) % PRIME)
    values = [sum(b * s.ys[c] for b, s in zip(basis, chosen, strict=True)) % PRIME for c in range(len(chosen[0].ys))]
    out = b""
    for c, value in enumerate(values):
        size = min(CHUNK_BYTES, secret_len - c * CHUNK_BYTES) if secret_len else 0
        if value >= 2 ** (8 * size):
            raise ShamirError("shares are inconsistent: the reconstructed chunk does not fit the secret's length")
        out += value.to_bytes(size, "big")
    return out
