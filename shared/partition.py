"""Splitting rows among simulated clients (IID or Dirichlet label skew) and holding out a test split.

Every party recomputes the same split from the seed, so no index list is ever sent.
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """A partitioning request that cannot be met."""


def train_test_split(num_rows: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) row indices; the test split is held out from every client."""
    if not 0.0 < test_fraction < 1.0:
        raise PartitionError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng([seed, 0x7E57]).permutation(num_rows)
    n_test = max(1, round(num_rows * test_fraction))
    if n_test >= num_rows:
        raise PartitionError(f"{num_rows} rows leave nothing to train on with test_fraction={test_fraction}")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def iid_partitions(num_rows: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the rows into ``num_partitions`` near-equal parts."""
    _check(num_rows, num_partitions)
    order = np.random.default_rng([seed, 0x11D]).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partitions(
    labels: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    min_rows: int = 8,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed parts: each class's rows are split among clients by proportions ~ Dirichlet(alpha).

    Redraws until every part has at least ``min_rows`` rows (DP-SGD needs some data to sample from).
    """
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    if alpha <= 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
    if len(labels) < num_partitions * min_rows:
        raise PartitionError(f"{len(labels)} rows cannot give {num_partitions} clients {min_rows} rows each")
    rng = np.random.default_rng([seed, 0xD1C])
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for cls in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_rows:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} rows gave all {num_partitions} clients "
        f"{min_rows} rows in {max_tries} draws; raise alpha or use fewer clients"
    )


def _check(num_rows: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise PartitionError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_rows < num_partitions:
        raise PartitionError(f"cannot split {num_rows} rows into {num_partitions} non-empty partitions")


def federated_split(
    labels: np.ndarray,
    *,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    test_fraction: float,
    seed: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Held-out test rows, then the remaining rows split among clients; all as indices into ``labels``."""
    train, test = train_test_split(len(labels), test_fraction=test_fraction, seed=seed)
    if partitioning == "iid":
        parts = iid_partitions(len(train), num_partitions, seed=seed)
    elif partitioning == "dirichlet":
        parts = dirichlet_partitions(np.asarray(labels)[train], num_partitions, alpha=alpha, seed=seed)
    else:
        raise PartitionError(f"partitioning must be 'iid' or 'dirichlet', got {partitioning!r}")
    return [train[p] for p in parts], test
