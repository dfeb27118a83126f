"""Fixed-point encoding of clipped, weighted updates into Z_{2^32}, with stochastic rounding.

A client's update ``u`` has ``||u||_2 <= C * w <= C * w_max``, so every coordinate satisfies
``|u_i| <= B = C * w_max``. It is encoded as ``round_stochastic(u_i * s) mod 2^32``. Stochastic rounding
(up with probability equal to the fractional part) is unbiased and errs by less than one unit ``1/s`` per
client and coordinate. The sum of ``n <= n_max`` encodings is at most ``n_max * (B * s + 1)`` in absolute
value; :meth:`FixedPoint.for_sum` picks the largest power of two ``s`` that keeps this below ``2^31``, so the
sum modulo ``2^32`` never wraps and decodes exactly (as a signed integer) to the sum of the rounded values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.discrete_noise import discrete_gaussian
from shared.distributed_dp import NoiseSizing

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
HALF_MODULUS = 2 ** (MODULUS_BITS - 1)
# Headroom for float32 round-off in a norm that was clipped to exactly the bound
NORM_TOLERANCE = 1e-5


class EncodingError(ValueError):
    """An input that cannot be encoded without wrapping, or impossible encoding parameters."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed point, ``scale`` units per 1.0; values in ``[-bound, bound]``; sums of up to ``max_clients``."""

    scale: float
    bound: float
    max_clients: int

    @classmethod
    def for_sum(cls, *, clip_norm: float, max_weight: float, max_clients: int) -> FixedPoint:
        """The finest power-of-two scale for which the sum of ``max_clients`` encodings cannot wrap."""
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise EncodingError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not (isinstance(max_weight, (int, float)) and math.isfinite(max_weight) and max_weight > 0):
            raise EncodingError(f"max_weight must be a finite number > 0, got {max_weight!r}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise EncodingError(f"max_clients must be an int >= 1, got {max_clients!r}")
        bound = float(clip_norm) * float(max_weight) * (1.0 + NORM_TOLERANCE)
        # n * (bound * s + 1) <= 2^31 - 1  <=>  s <= ((2^31 - 1) / n - 1) / bound
        room = (HALF_MODULUS - 1) / max_clients - 1.0
        if room < 1.0:
            raise EncodingError(f"max_clients = {max_clients} leaves no room in a {MODULUS_BITS}-bit sum")
        scale = 2.0 ** math.floor(math.log2(room / bound))
        return cls(scale=scale, bound=bound, max_clients=max_clients)

    @property
    def resolution(self) -> float:
        """One fixed-point unit: the largest rounding error of one client's coordinate."""
        return 1.0 / self.scale

    def sum_error_bound(self, n: int) -> float:
        """Largest absolute error, per coordinate, of the decoded sum of ``n`` encodings (worst case)."""
        return n / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``values`` (any float dtype, |v| <= bound) as ``uint32`` fixed point with stochastic rounding."""
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise EncodingError(f"values must be a 1-D vector, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise EncodingError("values must be finite, got NaN or inf")
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > self.bound:
            raise EncodingError(f"a coordinate of magnitude {peak} exceeds the encoding bound {self.bound}")
        scaled = x * self.scale
        floor = np.floor(scaled)
        rounded = floor + (rng.random(x.shape[0]) < (scaled - floor))
        return rounded.astype(np.int64).astype(np.uint32)

    def decode_sum(self, encoded_sum: np.ndarray, *, count: int) -> np.ndarray:
        """The float64 sum from the ``uint32`` sum of ``count`` encodings (``count <= max_clients``)."""
        if count > self.max_clients:
            raise EncodingError(f"a sum of {count} encodings exceeds max_clients = {self.max_clients}")
        s = np.asarray(encoded_sum)
        if s.dtype != np.uint32 or s.ndim != 1:
            raise EncodingError(f"encoded sum must be a 1-D uint32 vector, got {s.dtype} of shape {s.shape}")
        signed = s.astype(np.int64)
        signed[signed >= HALF_MODULUS] -= MODULUS
        return signed.astype(np.float64) / self.scale


def add_noise_share(encoded: np.ndarray, sizing: NoiseSizing) -> np.ndarray:
    """``encoded`` (``uint32``) plus one site's share of a round's distributed noise, modulo ``2^32``: discrete
    Gaussian of variance ``noise_stddev^2 / shares`` per coordinate, from the OS's CSPRNG."""
    noise = discrete_gaussian(encoded.size, sigma=sizing.noise_stddev / math.sqrt(sizing.shares))
    return ((encoded.astype(np.int64) + noise) % MODULUS).astype(np.uint32)
