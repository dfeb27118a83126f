"""What a site releases when it answers an evaluate request: DP-noised confusion-matrix counts, nothing else.

The counts ``C[true, predicted]`` over the site's rows change in exactly one cell, by 1, when one row is added
or removed: their L2 sensitivity is 1, so adding Gaussian noise of standard deviation ``sigma`` to every cell
is the Gaussian mechanism with noise multiplier ``sigma``. It is accounted as a :class:`DpEvent` with sample
rate 1 and one step (the same form as the feature-centering query) and recorded in the site's ledger as its
own release (purpose ``evaluate``); accuracy and the number of examples are computed from the noisy counts
(post-processing, no further cost). The loss is not released: per row it is unbounded.

The noise is drawn from the operating system's CSPRNG (``os.urandom``): 53 random bits per uniform, turned
into standard normals by the Box-Muller transform in float64. Nothing about it can be recomputed or predicted
by anyone who sees earlier outputs, unlike a seeded generator (numpy's PCG64 or torch's Mersenne Twister,
whose state follows from the seed or from enough outputs). What remains is the usual caveat of floating-point
Gaussian sampling (the noise is a float64, not an exact real; Mironov 2012 for the Laplace case): the released
counts are rounded to 1e-3 to blur the low-order bits, which is post-processing.
"""

from __future__ import annotations

import math
import os

import numpy as np

from shared.privacy import DpEvent

RELEASE_DECIMALS = 3  # rounding of the released noisy counts (post-processing)


def evaluation_event(noise_multiplier: float) -> DpEvent:
    """The privacy cost of one noisy confusion matrix: a Gaussian query over all rows, sensitivity 1."""
    return DpEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1, clip_norm=1.0)


def secure_standard_normal(size: int) -> np.ndarray:
    """``size`` independent N(0, 1) draws from the OS's CSPRNG (Box-Muller on 53-bit uniforms in (0, 1])."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    pairs = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype="<u8").reshape(pairs, 2) >> np.uint64(11)
    u1 = (raw[:, 0].astype(np.float64) + 1.0) / 2.0**53  # (0, 1]: log is finite
    u2 = raw[:, 1].astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])
    return normals[:size]


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``C[t, p]``: how many rows of true class ``t`` were predicted as ``p`` (int64, num_classes x num_classes)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions differ in shape: {labels.shape} vs {predictions.shape}")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def noisy_counts(counts: np.ndarray, *, noise_multiplier: float) -> np.ndarray:
    """``counts`` plus N(0, noise_multiplier^2) in every cell, rounded to :data:`RELEASE_DECIMALS`."""
    if not noise_multiplier > 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    noise = noise_multiplier * secure_standard_normal(counts.size).reshape(counts.shape)
    return np.round(counts.astype(np.float64) + noise, RELEASE_DECIMALS)


def released_metrics(noisy: np.ndarray) -> dict[str, float | int | list[float]]:
    """What the reply carries, all from the noisy counts: the counts, accuracy and number of examples."""
    total = float(noisy.sum())
    correct = float(np.trace(noisy))
    accuracy = min(max(correct / total, 0.0), 1.0) if total > 0 else 0.0
    return {
        "confusion-matrix": [float(v) for v in noisy.ravel()],  # row-major: true class, then predicted class
        "accuracy": accuracy,
        "num-examples": max(int(round(total)), 0),
    }
