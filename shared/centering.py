"""The feature-centering query of round 0: what a site releases, what it costs, how the server reads the sum.

A site's rows are pooled vectors ``x_i`` (the head's input). Each row contributes the vector ``(clip(x_i), C)``:
its pooled vector clipped to L2 norm ``C`` (``center-clip-norm``) with one more coordinate, the constant ``C``
(the row's count, in units of ``C``). Each such vector has norm at most ``sqrt(2) C``, so adding or removing one
row moves their sum ``(S, C n)`` by at most ``sqrt(2) C`` in L2: that is the query's sensitivity. The site adds
Gaussian noise of std ``sigma sqrt(2) C`` to every coordinate (``sigma``: ``center-noise-multiplier``), one
Gaussian mechanism with noise multiplier ``sigma``, recorded as ``DpEvent(1.0, sigma, 1, sqrt(2) C)``.

Neither the row count nor anything divided by it leaves the site: the noisy ``(S, C n)`` is divided by the
public constant :data:`ANSWER_SCALE` (so that it fits the secure-aggregation bound :func:`answer_bound`, like an
update) and summed over sites like an update. The server divides the summed vector part by the summed count
part (:func:`center_from_sum`), which is post-processing of what the mechanism released.
"""

from __future__ import annotations

import math

import numpy as np

from shared.privacy import DpEvent

ANSWER_SCALE = 10_000.0  # public rows: a site's answer (S, C n) / ANSWER_SCALE is within answer_bound up to ~9,500 rows


def sensitivity(clip_norm: float) -> float:
    """L2 sensitivity of the released sum ``(S, C n)`` under adding or removing one row: ``sqrt(2) C``."""
    if not clip_norm > 0.0:
        raise ValueError(f"center clip norm must be > 0, got {clip_norm}")
    return math.sqrt(2.0) * clip_norm


def query_event(*, clip_norm: float, noise_multiplier: float) -> DpEvent:
    """The query's privacy cost: one Gaussian mechanism over all the site's rows (sample rate 1), noise std
    ``noise_multiplier x sensitivity``."""
    return DpEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1, clip_norm=sensitivity(clip_norm))


def answer_bound(clip_norm: float) -> float:
    """The L2 bound a site's answer is clipped to before it is masked (the secure-aggregation bound of round 0).

    A site with ``n`` rows sends ``(S, C n) / ANSWER_SCALE`` plus noise, of norm at most
    ``n sqrt(2) C / ANSWER_SCALE`` before noise: within this bound for ``n`` up to ``ANSWER_SCALE`` less the
    noise's share. A larger site's answer is scaled down as a whole: its ratio of sum to count is kept, it only
    weighs less in the server's sum (post-processing; the privacy cost is the same).
    """
    return sensitivity(clip_norm)


def row_count_noise_std(*, noise_multiplier: float, sites: int) -> float:
    """Std of the noise on the summed row count of ``sites`` answers, in rows: each site's count coordinate
    ``C n`` carries noise of std ``sigma sqrt(2) C``, i.e. ``sigma sqrt(2)`` rows."""
    return noise_multiplier * math.sqrt(2.0) * math.sqrt(sites)


def center_from_sum(total: np.ndarray, *, clip_norm: float) -> tuple[np.ndarray | None, float]:
    """The center from the sum of the sites' answers: the summed noisy vector sum divided by the summed noisy
    row count. Returns (center or None, noisy row count); None when the noisy count is not positive (no site
    answered, or the noise outweighs the rows: the estimate would be meaningless)."""
    if total.ndim != 1 or total.shape[0] < 2:
        raise ValueError(f"a centering sum is a vector of the hidden size + 1, got shape {total.shape}")
    if not np.all(np.isfinite(total)):
        raise ValueError("the centering sum has non-finite values")
    rows = float(total[-1]) * ANSWER_SCALE / clip_norm
    if rows <= 0.0:
        return None, rows
    return (total[:-1] * (ANSWER_SCALE / rows)).astype(np.float32), rows
