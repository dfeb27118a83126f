"""A client's update as one flat vector with a known L2 bound (what secure aggregation encodes)."""

from __future__ import annotations

import numpy as np


def clip_to_norm(update: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` down to L2 norm ``max_norm`` if it is longer; returns (clipped, original norm)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm > max_norm:
        update = (update * (max_norm / norm)).astype(np.float32)
    return update.astype(np.float32), norm


def mean_from_sum(total: np.ndarray, total_weight: float) -> np.ndarray:
    """Sum-then-divide: the weights were fixed before the round, so the server needs only their sum."""
    if total_weight <= 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")
    return (total / total_weight).astype(np.float32)
