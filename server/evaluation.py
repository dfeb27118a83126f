"""The server's own evaluation, for every task: its held-out rows, the task's metrics on them each round, and
the best round so far (by the task's ``best_by``), whose adapter is kept in ``adapter-best/``.

The held-out rows are the server's own file in a deployment (``eval-data-path``) or the seeded test split of
the run's rows in a simulation (:mod:`shared.federation`); no site's data and no privacy budget covers them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from server.outputs import BEST_ADAPTER_DIR
from shared.config import RunConfig
from shared.federation import server_test_set
from shared.tasks.base import Metrics, Rows, Task

logger = logging.getLogger("privatune")


@dataclass(frozen=True)
class HeldOut:
    """The server's held-out rows, what a model is evaluated with, and the reference it must beat."""

    rows: Rows
    evaluate: Callable[[nn.Module], Metrics]
    reference: Metrics

    @classmethod
    def load(cls, task: Task, cfg: RunConfig, *, num_sites: int) -> HeldOut:
        if cfg.eval_data_path:  # deployment: the server's own evaluation file (the sites' data never leaves them)
            data = task.load_eval_rows(cfg)
            rows = data.subset(np.arange(min(len(data), cfg.max_test_examples or len(data))))
        else:
            rows = server_test_set(cfg, task.load_run_rows(cfg), num_partitions=num_sites)
        evaluate = task.evaluator(cfg, rows, device=cfg.server_device)
        if cfg.server_device != "cpu":
            evaluate = _back_on_cpu(evaluate)
        return cls(rows, evaluate, task.reference(rows))


def _back_on_cpu(evaluate: Callable[[nn.Module], Metrics]) -> Callable[[nn.Module], Metrics]:
    """``evaluate`` on ``server-device``, the model moved back to the CPU after: the aggregation, the checkpoints
    and the saved adapters read and write its weights as CPU arrays."""

    def on_device(model: nn.Module) -> Metrics:
        try:
            return evaluate(model)
        finally:
            model.to("cpu")

    return on_device


def update_best(
    history: dict[str, Any],
    task: Task,
    model: nn.Module,
    *,
    run_dir: Path,
    card: Mapping[str, Any],
    server_round: int,
    test: Metrics,
    aborted: bool,
) -> None:
    """Keep ``history["best"]`` and ``adapter-best/`` on the best round so far by the task's score on the held-out
    rows (the earliest on ties); an aborted round changed nothing and is never the best."""
    best = history.get("best")
    if aborted or (best is not None and task.score(test) <= task.score(best["test"])):
        return
    best_dir = task.save_adapter(
        model, run_dir / BEST_ADAPTER_DIR, card={**card, "round": server_round, "adapter": "best", "test": test}
    )
    history["best"] = {"round": server_round, "by": task.best_by, "test": test, "dir": str(best_dir)}
