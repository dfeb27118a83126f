"""What a run leaves behind each round: the round's record in metrics.json, the signed run ledger, the Prometheus
metrics, the checkpoint a crashed run resumes from, and the round's progress line. The same for every task: the
test metrics are whatever the task's evaluator returned."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.checkpoint import Checkpoint, save_checkpoint
from server.monitoring import RunMonitor
from server.optimizer import ServerOptimizer
from server.outputs import METRICS_FILE, write_json_atomic
from server.round_result import RoundAggregate
from server.run_ledger import RunLedger
from shared import constants as C
from shared.config import RunConfig
from shared.ledger import digest_array

logger = logging.getLogger("privatune")


def site_name(agg: RoundAggregate, node: int) -> str:
    return agg.site_ids.get(node, f"node-{node}")


def client_epsilons(agg: RoundAggregate) -> dict[str, dict[str, Any]]:
    """Each site's reported cumulative epsilon (None: no finite epsilon), by site name, and its train loss where
    it reported one (only non-private rounds do: under DP no site releases its loss)."""
    clients: dict[str, dict[str, Any]] = {}
    for n, m in agg.client_metrics.items():
        epsilon = m.get(C.METRIC_EPSILON)
        # inf (non-private, sent as -1) and a missing or non-finite value are not JSON: None, "no finite epsilon"
        finite = epsilon is not None and math.isfinite(epsilon) and epsilon >= 0
        entry: dict[str, Any] = {"epsilon": epsilon if finite else None}
        loss = m.get(C.METRIC_TRAIN_LOSS)
        if loss is not None and math.isfinite(loss):
            entry["train_loss"] = loss
        clients[site_name(agg, n)] = entry
    return clients


def train_losses(agg: RoundAggregate) -> list[float]:
    """The sites' reported train losses (non-private rounds only), the finite ones."""
    losses = (m.get(C.METRIC_TRAIN_LOSS) for m in agg.client_metrics.values())
    return [loss for loss in losses if loss is not None and math.isfinite(loss)]


def max_epsilon(agg: RoundAggregate) -> str:
    """The largest cumulative epsilon the sites reported, as the progress line shows it."""
    values = [m[C.METRIC_EPSILON] for m in agg.client_metrics.values() if C.METRIC_EPSILON in m]
    if not values:
        return "-"
    top = max(values)
    return "inf" if top < 0 or math.isinf(top) else f"{top:.2f}"


def participation(agg: RoundAggregate, sampled: list[int]) -> dict[str, Any]:
    """Who was asked, who answered, dropped out or declined (and why), by site name."""
    site = lambda n: site_name(agg, n)  # noqa: E731
    return {
        "sampled": [site(n) for n in sampled],
        "survivors": [site(n) for n in agg.survivors],
        "dropped": [site(n) for n in agg.dropped],
        "declined": {site(n): agg.decline_reasons.get(n, "") for n in agg.declined},
        "aborted": agg.aborted,
        "abort_reason": agg.abort_reason,
    }


@dataclass
class RunRecorder:
    """The run's history (metrics.json), its signed run ledger, its monitor and its checkpoints."""

    cfg: RunConfig
    run_id: str
    run_dir: Path
    history: dict[str, Any]
    run_ledger: RunLedger
    monitor: RunMonitor
    lineage: list[str] = field(default_factory=list)

    def ledger_round(self, server_round: int, agg: RoundAggregate, parts: Mapping[str, Any], metrics: Any) -> None:
        """Append the round's entry (who took part, the aggregate's hash, the sites' attestations) to the run
        ledger and report it to the monitor."""
        self.run_ledger.record_round(
            server_round,
            participants=parts["sampled"],
            declined=parts["declined"],
            survivors=parts["survivors"],
            dropped=parts["dropped"],
            aborted=agg.aborted,
            aggregate_hash=digest_array(agg.total) if agg.total is not None else None,
            attestations={site_name(agg, n): att for n, att in agg.attestations.items()},
            metrics=metrics,
            secure_aggregation=self.cfg.secure_aggregation,
            # round 0 (the centering query) always carries local noise
            dp_noise=(self.cfg.dp_noise if server_round > 0 else "local") if self.cfg.dp else None,
        )

    def record_round(
        self, server_round: int, *, sampled: list[int], agg: RoundAggregate, test: Any, seconds: float
    ) -> dict[str, Any]:
        """The round's record, appended to the history and the run ledger; metrics.json is rewritten."""
        parts = participation(agg, sampled)
        record: dict[str, Any] = {
            "round": server_round,
            "test": test,
            "clients": client_epsilons(agg),
            **parts,
            "secure_aggregation": self.cfg.secure_aggregation,
            "dp_noise": self.cfg.dp_noise,
            "seconds": seconds,
        }
        losses = train_losses(agg)
        if losses:  # a non-private round: the sites' exact mean train loss (a DP round releases none)
            record["train_loss"] = float(np.mean(losses))
        self.history["rounds"].append(record)
        self.ledger_round(server_round, agg, parts, test)
        self.write()
        self.monitor.record_round(self.run_ledger.records()[-1], seconds=seconds)
        return record

    def checkpoint(
        self,
        server_round: int,
        *,
        rng: np.random.Generator,
        arrays: Mapping[str, np.ndarray],
        server_opt: ServerOptimizer,
    ) -> None:
        """What a crashed run resumes from (``resume``): the global tensors, the sampler's and the server
        optimizer's state, the history and the run ledger's head after ``server_round``."""
        records = self.run_ledger.records()
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                run_id=self.run_id,
                lineage=self.lineage,
                server_round=server_round,
                config=self.cfg.to_flower(),
                rng_state=dict(rng.bit_generator.state),
                history=self.history,
                run_ledger_head=records[-1]["entry_hash"] if records else None,
                arrays=dict(arrays),
                strategy_state=server_opt.state_dict(),
            ),
        )

    def write(self) -> None:
        write_json_atomic(self.run_dir / METRICS_FILE, self.history)


def log_round(
    server_round: int,
    cfg: RunConfig,
    *,
    record: Mapping[str, Any],
    agg: RoundAggregate,
    metrics: str,
    warnings: list[str],
    best_round: int | None,
) -> None:
    """The round's progress line (``metrics``: the task's own description of its test metrics) and a warning
    per declining site."""
    for node, reason in agg.decline_reasons.items():
        logger.warning("round %d: %s declined: %s", server_round, site_name(agg, node), reason)
    note = ""
    survivors, sampled = record["survivors"], record["sampled"]
    if agg.aborted:
        note = f" | ABORTED: {agg.abort_reason}"
    elif agg.dropped or agg.declined:
        note = (
            f" | {len(survivors)}/{len(sampled)} sites ({len(record['dropped'])} dropped, "
            f"{len(record['declined'])} declined)"
        )
    if "train_loss" in record:
        note += f" | NON-PRIVATE train loss {record['train_loss']:.4f}"
    if warnings:
        note += " | WARNING: " + "; ".join(warnings)
    logger.info(
        "round %d/%d | %s | best round %s | max eps %s | %.1fs%s",
        server_round,
        cfg.num_server_rounds,
        metrics,
        best_round if best_round is not None else "-",
        max_epsilon(agg),
        record["seconds"],
        note,
    )
