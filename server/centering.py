"""Round 0 of a centered run (``center-features``, a task with the ``centering`` capability): the sites' noisy
sums of pooled vectors and noisy row counts, summed (securely, by default), the one divided by the other
(:mod:`shared.centering`); the center is used only where its expected noise is small against its norm."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from server.aggregation import aggregate
from server.recording import client_epsilons, max_epsilon, participation
from server.round_result import RoundAggregate
from shared import constants as C
from shared.centering import answer_bound, center_from_sum, row_count_noise_std, sensitivity
from shared.config import RunConfig
from shared.identity import Roster
from shared.records import record_from_arrays
from shared.tasks.base import FeatureCentering

logger = logging.getLogger("privatune")

# A DP center whose expected error (noise norm over the noisy row count) exceeds this share of its own norm is
# not used: with few rows per site it would shift every row by a random vector and the head would learn that.
CENTER_MAX_ERROR = 0.5


def estimate_feature_center(
    grid: Grid,
    cfg: RunConfig,
    *,
    node_ids: list[int],
    global_arrays: dict[str, np.ndarray],
    hidden_size: int,
    run_id: str,
    roster: Roster | None,
) -> tuple[np.ndarray | None, float | None, RoundAggregate]:
    """The round-0 query: each site answers under the Gaussian mechanism at ``center-noise-multiplier`` and
    records the query in its ledger; its cost is part of the sites' noise calibration. The server learns only
    the sum. Returns the center (None if no site answered or the noisy row count is not positive), the noisy
    row count, and the round's aggregate.
    """
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(global_arrays),
            C.TRAIN_CONFIG_RECORD: ConfigRecord(
                {C.KEY_SERVER_ROUND: 0, C.KEY_RUN_ID: run_id, C.KEY_TASK: C.TASK_FEATURE_MEAN}
            ),
        }
    )
    agg = aggregate(
        grid,
        cfg,
        node_ids=node_ids,
        content=content,
        server_round=0,
        run_id=run_id,
        dim=hidden_size + 1,  # the vector sum and the count
        roster=roster,
        clip_norm=answer_bound(cfg.center_clip_norm),
    )
    if agg.total is None or agg.total_weight <= 0:
        return None, None, agg
    center, rows = center_from_sum(agg.total, clip_norm=cfg.center_clip_norm)
    return center, rows, agg


def center_is_usable(cfg: RunConfig, center: np.ndarray, *, rows: float, sites: int) -> tuple[bool, float]:
    """Whether the noisy center is worth using (its expected noise norm at most ``CENTER_MAX_ERROR`` x its norm),
    and that expected noise norm; public numbers only, so the decision costs no privacy."""
    error = center_error(cfg, rows=rows, sites=sites, hidden_size=int(center.shape[0]))
    return error <= CENTER_MAX_ERROR * float(np.linalg.norm(center)), error


def center_error(cfg: RunConfig, *, rows: float, sites: int, hidden_size: int) -> float:
    """Expected L2 norm of the DP noise in the center: the noise on the summed vector (std
    ``center-noise-multiplier x sensitivity`` per coordinate and site) over ``sqrt(hidden_size)`` coordinates,
    divided by the noisy row count. Public numbers only (post-processing)."""
    if not cfg.dp:
        return 0.0
    std = cfg.center_noise_multiplier * sensitivity(cfg.center_clip_norm) * math.sqrt(sites)
    return std * math.sqrt(hidden_size) / max(rows, 1e-9)


def center_round(
    grid: Grid,
    cfg: RunConfig,
    nodes: list[int],
    model: nn.Module,
    centering: FeatureCentering,
    global_arrays: dict[str, np.ndarray],
    run_id: str,
    roster: Roster | None,
) -> tuple[dict[str, Any], RoundAggregate]:
    """Run the centering query with every connected site, set the model's center; its record for the metrics
    JSON, and its aggregate (for the run ledger)."""
    started = time.monotonic()
    previous = centering.get_center(model)
    center, rows, agg = estimate_feature_center(
        grid,
        cfg,
        node_ids=nodes,
        global_arrays=global_arrays,
        hidden_size=int(previous.shape[0]),
        run_id=run_id,
        roster=roster,
    )
    error: float | None = None
    if center is None:
        logger.warning(
            "round 0 | feature centering: %s; training on the uncentered vector",
            f"the noisy row count is {rows:.1f}, not positive"
            if rows is not None
            else f"no site answered ({agg.abort_reason or 'all dropped or declined'})",
        )
    else:
        usable, error = center_is_usable(cfg, center, rows=rows or 0.0, sites=len(agg.survivors))
        if not usable:
            logger.warning(
                "round 0 | feature centering: the center's expected noise (norm %.2f) exceeds %.0f%% of its norm "
                "%.2f (%.0f noisy rows over %d sites are too few for center-noise-multiplier %g): training on the "
                "uncentered vector",
                error,
                100 * CENTER_MAX_ERROR,
                float(np.linalg.norm(center)),
                rows or 0.0,
                len(agg.survivors),
                cfg.center_noise_multiplier,
            )
            center = None
    if center is not None:
        centering.set_center(model, center)
        count_std = row_count_noise_std(noise_multiplier=cfg.center_noise_multiplier, sites=len(agg.survivors))
        if cfg.dp and rows is not None and rows < 3.0 * count_std:
            logger.warning(
                "round 0 | feature centering: the noisy row count %.1f is within 3 standard deviations (%.1f) of "
                "its noise: the center is a poor estimate (too few rows for center-noise-multiplier %g)",
                rows,
                count_std,
                cfg.center_noise_multiplier,
            )
    seconds = time.monotonic() - started
    logger.info(
        "round 0 | feature centering: %d/%d sites | center norm %s | max eps %s | %.1fs",
        len(agg.survivors),
        len(nodes),
        f"{float(np.linalg.norm(center)):.3f}" if center is not None else "-",
        max_epsilon(agg),
        seconds,
    )
    parts = participation(agg, nodes)
    record = {
        "noise_multiplier": cfg.center_noise_multiplier if cfg.dp else 0.0,
        "clip_norm": cfg.center_clip_norm,
        "sensitivity": sensitivity(cfg.center_clip_norm),
        "noisy_rows": rows,  # the sites' summed noisy row count (what the center divides by)
        **parts,
        "clients": client_epsilons(agg),
        "center": [float(v) for v in center] if center is not None else None,  # None: not used
        "expected_noise": error,  # the center's expected noise norm (not used above CENTER_MAX_ERROR x its norm)
        "seconds": seconds,
    }
    return record, agg
