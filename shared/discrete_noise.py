"""Discrete Gaussian noise on the integers, drawn from the operating system's CSPRNG.

A site's share of the distributed noise (:mod:`shared.distributed_dp`) is added in the integer domain, after
fixed-point encoding and before masking, so it must itself be an integer: the discrete Gaussian
``N_Z(0, sigma^2)``, ``P[X = x]`` proportional to ``exp(-x^2 / (2 sigma^2))`` (Canonne, Kamath, Steinke 2020).

The sampler is CKS's Algorithm 3, vectorised: a discrete Laplace candidate ``Y`` of scale
``t = floor(sigma) + 1`` (the difference of two geometric variables), accepted with probability
``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``; about 60-80% of candidates are accepted. Every uniform comes from
``os.urandom`` (:class:`client.dp_random.SecureRandom`'s 53-bit uniforms); numpy only does the arithmetic. The
geometric and the acceptance test are computed in float64, not with CKS's exact rational arithmetic (which runs
at a few thousand draws a second in Python, too slow for 10^5 coordinates); the relative error of each
probability is that of float64 (about 1e-16), far below every other approximation in the analysis, and the
output is an integer, so no floating-point pattern can reveal the value the noise was added to.
"""

from __future__ import annotations

import math
import os

import numpy as np

_TWO_POW_MINUS_53 = 2.0**-53


def _uniform(n: int) -> np.ndarray:
    """``n`` float64 uniforms ``k / 2^53`` in [0, 1) from the kernel's CSPRNG."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


def _geometric(n: int, scale: float) -> np.ndarray:
    """``n`` draws with ``P[G >= k] = exp(-k / scale)`` on {0, 1, ...} (inverse CDF of a CSPRNG uniform)."""
    u = 1.0 - _uniform(n)  # (0, 1]: log never sees 0
    return np.floor(-scale * np.log(u))


def discrete_gaussian(size: int, *, sigma: float) -> np.ndarray:
    """``size`` independent draws of ``N_Z(0, sigma^2)`` as int64 (all zero for ``sigma == 0``)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if sigma == 0.0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    if sigma > 2.0**40:
        raise ValueError(f"sigma must be at most 2^40 (int64 draws), got {sigma}")
    t = math.floor(sigma) + 1.0
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        need = size - filled
        batch = need + need // 2 + 16  # acceptance is above 1/2 for every sigma: usually one pass
        y = _geometric(batch, t) - _geometric(batch, t)  # discrete Laplace, P[Y = y] ~ exp(-|y| / t)
        accept = _uniform(batch) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2.0 * sigma * sigma))
        kept = y[accept][:need].astype(np.int64)
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out
