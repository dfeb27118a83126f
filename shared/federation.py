"""Which rows a party uses: the server's held-out test split and each site's training rows, for any task.

In simulation every party recomputes the same split of the run's rows (the task's ``load_run_rows``) from the
seed, stratified by the rows' ``strata`` (the classifier: its labels; a task without classes: all zeros). A
deployed site reads its own file through the task (``load_site_rows``) with its own node config, never with
the run config's: the run config's columns name the server's own files, and a run whose label set or task
differs from the site's is refused by the site's policy (client/site_policy.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.config import RunConfig
from shared.data import DataError, LabelledText, load_labelled_text
from shared.partition import federated_split
from shared.site import Site
from shared.tasks.base import Rows, Task


def load_run_dataset(cfg: RunConfig) -> LabelledText:
    """The run's whole dataset. Cached per process while the file is unchanged (same size and mtime): a
    simulated site re-reads it every round, and decompressing the bundled corpus is not free."""
    file = Path(cfg.data_path).expanduser()
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    labels = None if cfg.label_names is None else tuple(cfg.label_names)
    return _load_cached(cfg.data_path, stamp, cfg.text_column, cfg.label_column, labels)


@lru_cache(maxsize=4)
def _load_cached(
    data_path: str, _stamp: tuple[int, int] | None, text_column: str, label_column: str, labels: tuple[str, ...] | None
) -> LabelledText:
    return load_labelled_text(
        data_path, text_column=text_column, label_column=label_column, labels=labels, warn_stray=True
    )


def simulated_split(cfg: RunConfig, data: Rows, num_partitions: int) -> tuple[list[np.ndarray], np.ndarray]:
    return federated_split(
        data.strata,
        num_partitions=num_partitions,
        partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


def server_test_set(cfg: RunConfig, data: Rows, num_partitions: int) -> Rows:
    """The held-out test rows (capped at ``max_test_examples`` by a seeded draw)."""
    _, test = simulated_split(cfg, data, num_partitions)
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        rng = np.random.default_rng([cfg.seed, 0x7E5])
        test = np.sort(rng.choice(test, size=cfg.max_test_examples, replace=False))
    return data.subset(test)


def site_training_rows(cfg: RunConfig, site: Site, task: Task) -> Rows:
    """A site's own training rows: its partition of the run's rows in simulation, its own file when deployed."""
    if site.simulated:
        assert site.partition_id is not None
        if not site.num_partitions:
            raise DataError("simulation node config has no num-partitions")
        data = task.load_run_rows(cfg)
        parts, _ = simulated_split(cfg, data, site.num_partitions)
        rows = data.subset(parts[site.partition_id])
    else:
        rows = task.load_site_rows(site)
    if len(rows) == 0:
        raise DataError(f"site {site.site_id} has no training rows")
    return rows
