"""Continuing an interrupted run (``resume``) from its last checkpointed round, under a new run id."""

from __future__ import annotations

import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from server.checkpoint import check_resumable, load_checkpoint
from server.optimizer import ServerOptimizer
from server.outputs import BEST_ADAPTER_DIR
from shared.config import RunConfig
from shared.model import set_trainable
from shared.tasks.base import FeatureCentering

logger = logging.getLogger("privatune")


@dataclass
class Resumed:
    """Where the resumed run starts: its global tensors, sampler, first round, lineage, optimizer and history."""

    arrays: OrderedDict[str, np.ndarray]
    rng: np.random.Generator
    first_round: int
    lineage: list[str]
    server_opt: ServerOptimizer
    history: dict[str, Any]


def resume_run(
    cfg: RunConfig,
    *,
    run_id: str,
    run_dir: Path,
    model: nn.Module,
    global_arrays: OrderedDict[str, np.ndarray],
    server_opt: ServerOptimizer,
    history: dict[str, Any],
    centering: FeatureCentering | None,
) -> Resumed:
    """Load ``resume``'s checkpoint (refused unless its config and tensors match this run's), set its tensors and
    feature center into ``model``, and carry its best-round adapter over into ``run_dir``. ``history`` holds
    this run's own fields (run id, config, the task's), which replace the checkpoint's."""
    ckpt = load_checkpoint(Path(cfg.resume))
    check_resumable(ckpt, cfg.to_flower(), dict(global_arrays))
    arrays = type(global_arrays)((n, ckpt.arrays[n]) for n in global_arrays)
    set_trainable(model, arrays)
    lineage = [*ckpt.lineage, ckpt.run_id]
    if ckpt.strategy_state:
        server_opt = ServerOptimizer.from_state_dict(ckpt.strategy_state)
    own = {k: v for k, v in history.items() if k not in ("initial_test", "rounds")}
    resumed = {**ckpt.history, **own, "resumed_from": lineage}
    center = (resumed.get("feature_centering") or {}).get("center")
    if center is not None and centering is not None:
        centering.set_center(model, np.asarray(center, dtype=np.float32))
    previous_best = Path(cfg.resume) / BEST_ADAPTER_DIR
    if resumed.get("best") and previous_best.is_dir():  # the best round so far may be an earlier run's
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(previous_best, run_dir / BEST_ADAPTER_DIR, dirs_exist_ok=True)
        resumed["best"] = {**resumed["best"], "dir": str(run_dir / BEST_ADAPTER_DIR)}
    elif resumed.get("best"):
        logger.warning("%s is missing: the best round will be chosen among the resumed rounds", previous_best)
        resumed.pop("best")
    logger.info("resuming run %s after its round %d (checkpoint in %s)", ckpt.run_id, ckpt.server_round, cfg.resume)
    return Resumed(arrays, ckpt.rng(), ckpt.server_round + 1, lineage, server_opt, resumed)
