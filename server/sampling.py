"""Which sites take part: wait until enough nodes are connected, then sample a round's cohort from the seed."""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.serverapp import Grid

from shared.config import RunConfig

NODE_WAIT_S = 120.0
NODE_SETTLE_S = 1.0  # at start-up: wait until no more nodes join for this long


def wait_for_nodes(grid: Grid, minimum: int, *, timeout_s: float = NODE_WAIT_S, settle_s: float = 0.0) -> list[int]:
    """The connected node ids, once there are at least ``minimum``; with ``settle_s``, once their number has also
    stopped growing for ``settle_s`` seconds (Flower's simulation registers its nodes while the ServerApp starts:
    a run that took the first ``minimum`` would leave the rest out of its roster and its round 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            while settle_s > 0:
                time.sleep(settle_s)
                more = sorted(grid.get_node_ids())
                if len(more) <= len(nodes):
                    break
                nodes = more
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} node(s) connected after {timeout_s:.0f}s; need min-train-nodes={minimum}"
            )
        time.sleep(1.0)


def sample_nodes(nodes: list[int], cfg: RunConfig, rng: np.random.Generator) -> list[int]:
    """The round's cohort: ``fraction-train`` of the connected nodes, at least ``min-train-nodes``, sorted."""
    k = min(len(nodes), max(cfg.min_train_nodes, math.ceil(cfg.fraction_train * len(nodes))))
    picks = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids are uint64, numpy would mangle them
    return sorted(nodes[i] for i in picks)
