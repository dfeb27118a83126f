"""The ServerApp: sample sites, aggregate their updates (securely by default), evaluate, record, repeat.

Aggregation is sum-then-divide with weights fixed before the round (weight 1 per surviving site), so the
server never needs any site's example count and can work from the sum alone.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.aggregation import INSECURE_WARNING, aggregate_plain
from server.checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from server.monitoring import RunMonitor
from server.optimizer import ServerOptimizer
from server.outputs import (
    ADAPTER_DIR,
    BEST_ADAPTER_DIR,
    METRICS_FILE,
    publish_adapter,
    save_adapter,
    write_json_atomic,
)
from server.round_result import RoundAggregate
from server.run_ledger import RunLedger
from shared import constants as C
from shared.canary_data import CanaryScorer
from shared.centering import answer_bound, center_from_sum, row_count_noise_std, sensitivity
from shared.config import ConfigError, RunConfig
from shared.data import load_labelled_text
from shared.federation import load_run_dataset, server_test_set
from shared.identity import Roster, provision_simulation
from shared.ledger import RUN_LEDGER_FILE, digest_array
from shared.log import RoundProgress, configure_logging
from shared.metrics import evaluate_model, majority_baseline, quality_warnings
from shared.model import (
    build_model,
    encode,
    flatten,
    fold_feature_center,
    get_feature_center,
    get_trainable,
    load_tokenizer,
    set_feature_center,
    set_trainable,
    unflatten,
)
from shared.records import record_from_arrays
from shared.updates import mean_from_sum

logger = logging.getLogger("privatune")

app = ServerApp()

NODE_WAIT_S = 120.0
NODE_SETTLE_S = 1.0  # at start-up: wait until no more nodes join for this long
# A DP center whose expected error (noise norm over the noisy row count) exceeds this share of its own norm is
# not used: with few rows per site it would shift every row by a random vector and the head would learn that.
CENTER_MAX_ERROR = 0.5
BEST_BY = "macro_f1"  # the best round: highest macro-F1 on the server's held-out test set (earliest on ties)


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
    k = min(len(nodes), max(cfg.min_train_nodes, math.ceil(cfg.fraction_train * len(nodes))))
    picks = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids are uint64, numpy would mangle them
    return sorted(nodes[i] for i in picks)


def _aggregate(
    grid: Grid,
    cfg: RunConfig,
    *,
    node_ids: list[int],
    content: RecordDict,
    server_round: int,
    run_id: str,
    dim: int,
    roster: Roster | None,
    clip_norm: float | None = None,
) -> RoundAggregate:
    bound = cfg.update_clip_norm if clip_norm is None else clip_norm
    if cfg.secure_aggregation:
        from server.secagg_workflow import aggregate_secure, settings_from_config

        return aggregate_secure(
            grid,
            node_ids=node_ids,
            content=content,
            server_round=server_round,
            run_id=run_id,
            settings=settings_from_config(
                cfg, num_clients=len(node_ids), dim=dim, clip_norm=bound, distributed_noise=clip_norm is None
            ),
            timeout_s=cfg.secagg_timeout * 4,  # the stage that includes local training
            roster=roster,
        )
    return aggregate_plain(
        grid,
        node_ids=node_ids,
        content=content,
        update_clip_norm=bound,
        dim=dim,
        timeout_s=cfg.secagg_timeout * 4,
    )


def _client_epsilons(agg: RoundAggregate) -> dict[str, dict[str, Any]]:
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
        clients[_site_name(agg, n)] = entry
    return clients


def _train_losses(agg: RoundAggregate) -> list[float]:
    """The sites' reported train losses (non-private rounds only), the finite ones."""
    losses = (m.get(C.METRIC_TRAIN_LOSS) for m in agg.client_metrics.values())
    return [loss for loss in losses if loss is not None and math.isfinite(loss)]


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
    """Round 0 of a centered run: the sites' noisy sums of pooled vectors and noisy row counts, summed (securely,
    by default), the one divided by the other (:mod:`shared.centering`).

    Each site answers under the Gaussian mechanism at ``center-noise-multiplier`` and records the query in its
    ledger; its cost is part of the sites' noise calibration. The server learns only the sum. Returns the
    center (None if no site answered or the noisy row count is not positive), the noisy row count, and the
    round's aggregate.
    """
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(global_arrays),
            C.TRAIN_CONFIG_RECORD: ConfigRecord(
                {C.KEY_SERVER_ROUND: 0, C.KEY_RUN_ID: run_id, C.KEY_TASK: C.TASK_FEATURE_MEAN}
            ),
        }
    )
    agg = _aggregate(
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


def _site_name(agg: RoundAggregate, node: int) -> str:
    return agg.site_ids.get(node, f"node-{node}")


def _fmt_eps(values: list[float]) -> str:
    if not values:
        return "-"
    top = max(values)
    return "inf" if top < 0 or math.isinf(top) else f"{top:.2f}"


def _center_round(
    grid: Grid,
    cfg: RunConfig,
    nodes: list[int],
    model: Any,
    global_arrays: dict[str, np.ndarray],
    run_id: str,
    roster: Roster | None,
) -> tuple[dict[str, Any], RoundAggregate]:
    """Run the centering query with every connected site, set the model's center; its record for the metrics
    JSON, and its aggregate (for the run ledger)."""
    started = time.monotonic()
    previous = get_feature_center(model)
    center, rows, agg = estimate_feature_center(
        grid,
        cfg,
        node_ids=nodes,
        global_arrays=global_arrays,
        hidden_size=int(previous.shape[0]),
        run_id=run_id,
        roster=roster,
    )
    site = partial(_site_name, agg)
    clients = _client_epsilons(agg)
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
        set_feature_center(model, center)
        count_std = row_count_noise_std(noise_multiplier=cfg.center_noise_multiplier, sites=len(agg.survivors))
        if cfg.dp and rows is not None and rows < 3.0 * count_std:
            logger.warning(
                "round 0 | feature centering: the noisy row count %.1f is within 3 standard deviations (%.1f) of "
                "its noise: the center is a poor estimate (too few rows for center-noise-multiplier %g)",
                rows,
                count_std,
                cfg.center_noise_multiplier,
            )
    epsilons = [m[C.METRIC_EPSILON] for m in agg.client_metrics.values() if C.METRIC_EPSILON in m]
    seconds = time.monotonic() - started
    logger.info(
        "round 0 | feature centering: %d/%d sites | center norm %s | max eps %s | %.1fs",
        len(agg.survivors),
        len(nodes),
        f"{float(np.linalg.norm(center)):.3f}" if center is not None else "-",
        _fmt_eps(epsilons),
        seconds,
    )
    record = {
        "noise_multiplier": cfg.center_noise_multiplier if cfg.dp else 0.0,
        "clip_norm": cfg.center_clip_norm,
        "sensitivity": sensitivity(cfg.center_clip_norm),
        "noisy_rows": rows,  # the sites' summed noisy row count (what the center divides by)
        "sampled": [site(n) for n in nodes],
        "survivors": [site(n) for n in agg.survivors],
        "dropped": [site(n) for n in agg.dropped],
        "declined": {site(n): agg.decline_reasons.get(n, "") for n in agg.declined},
        "aborted": agg.aborted,
        "abort_reason": agg.abort_reason,
        "clients": clients,
        "center": [float(v) for v in center] if center is not None else None,  # None: not used
        "expected_noise": error,  # the center's expected noise norm (not used above CENTER_MAX_ERROR x its norm)
        "seconds": seconds,
    }
    return record, agg


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    run_id = str(context.run_id)
    run_dir = cfg.run_dir(run_id)
    if not cfg.dp:
        logger.warning(
            "DIFFERENTIAL PRIVACY IS OFF: this is a non-private baseline; no epsilon holds, and every "
            "site's ledger records epsilon = inf for its data."
        )
    if not cfg.secure_aggregation:
        logger.warning(INSECURE_WARNING)
    if cfg.dp and cfg.reproducible_noise:
        logger.warning(
            "REPRODUCIBLE NOISE: DP noise and sampling are seeded from the run seed, which the server "
            "knows; the epsilon printed does NOT hold against the server. For experiments only."
        )

    if cfg.resume and not cfg.roster_path and not cfg.sim_dir:
        raise ConfigError("resume in a simulation needs sim-dir set: the sites' ledgers must outlive the restart")
    nodes = wait_for_nodes(grid, cfg.min_train_nodes, settle_s=NODE_SETTLE_S)
    sim_dir: Path | None = None
    roster: Roster | None = None
    if cfg.eval_data_path:  # deployment: the server's own evaluation file (the sites' data never leaves them)
        data = load_labelled_text(
            cfg.eval_data_path, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.label_names
        )
        test = data.subset(np.arange(min(len(data), cfg.max_test_examples or len(data))))
    else:
        data = load_run_dataset(cfg)
        test = server_test_set(cfg, data, num_partitions=len(nodes))
    # the data and the model load before anything is written: a bad path or column leaves no run dir and no keys
    model = build_model(cfg, num_labels=len(data.label_names))
    tokenizer = load_tokenizer(cfg.model_path)
    test_enc = encode(tokenizer, test.texts, test.labels, max_length=cfg.max_length)
    label_names = list(data.label_names)
    majority = majority_baseline(test.labels, num_classes=len(label_names))
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.roster_path:  # deployment: sites were provisioned beforehand (privatune provision)
        roster = Roster.load(Path(cfg.roster_path).expanduser())
    else:  # simulation: the simulated sites' identities are made at start-up
        sim_dir = cfg.simulation_dir(run_id)
        roster = provision_simulation(sim_dir, len(nodes))
    run_ledger = RunLedger(run_dir / RUN_LEDGER_FILE, run_id, roster=roster)
    monitor = RunMonitor(run_id, port=cfg.metrics_port)  # Prometheus metrics (metrics-port; 0 = not served)
    global_arrays = get_trainable(model)
    dim = int(flatten(global_arrays).shape[0])
    logger.info(
        "run %s: %d sites, %d rounds, %s, %d trainable parameters, test set %d rows (majority class %r: accuracy "
        "%.4f, macro-F1 %.4f), DP %s, secure aggregation %s",
        run_id,
        len(nodes),
        cfg.num_server_rounds,
        "FFA-LoRA" if cfg.lora_mode == "ffa" else "plain LoRA",
        dim,
        len(test),
        label_names[int(majority["class"])],
        majority["accuracy"],
        majority["macro_f1"],
        (
            f"on, {cfg.dp_noise} noise (target epsilon {cfg.target_epsilon:g}, noise multiplier "
            f"{cfg.noise_multiplier:g}, delta {cfg.delta:g})"
        )
        if cfg.dp
        else "OFF",  # fmt: skip
        "on" if cfg.secure_aggregation else "OFF",
    )
    scorer = CanaryScorer.start(
        model,
        lambda texts, labels: encode(tokenizer, texts, labels, max_length=cfg.max_length),
        canaries=cfg.canaries,
        seed=cfg.seed,
        num_sites=len(nodes),
        num_labels=len(data.label_names),
    )
    centering: tuple[dict[str, Any], RoundAggregate] | None = None
    if cfg.center_features and not cfg.resume:  # a resumed run takes the center from its checkpoint (below)
        with RoundProgress("round 0 (feature centering)"):
            centering = _center_round(grid, cfg, nodes, model, global_arrays, run_id, roster)
    baseline = evaluate_model(model, test_enc, num_classes=len(data.label_names))
    history: dict[str, Any] = {
        "run_id": run_id,
        "config": cfg.to_flower(),
        "label_names": label_names,
        "majority_baseline": majority,  # always predicting the most frequent test class
        "initial_test": baseline,
        "rounds": [],
    }
    if centering is not None:
        record, agg = centering
        history["feature_centering"] = record
        run_ledger.record_round(
            0,
            participants=record["sampled"],
            declined=record["declined"],
            survivors=record["survivors"],
            dropped=record["dropped"],
            aborted=agg.aborted,
            aggregate_hash=digest_array(agg.total) if agg.total is not None else None,
            attestations={_site_name(agg, n): att for n, att in agg.attestations.items()},
            metrics=baseline,
            secure_aggregation=cfg.secure_aggregation,
        )
        monitor.record_round(run_ledger.records()[-1], seconds=record["seconds"])
    logger.info(
        "round 0 | test loss %.4f acc %.4f f1 %.4f (before training)",
        baseline["loss"],
        baseline["accuracy"],
        baseline["macro_f1"],
    )
    rng = np.random.default_rng([cfg.seed, 0x5A3])
    server_opt = ServerOptimizer(kind=cfg.server_optimizer, learning_rate=cfg.server_learning_rate, tau=cfg.server_tau)
    first_round, lineage = 1, []
    if cfg.resume:  # continue an interrupted run from its last checkpointed round, under this new run id
        ckpt = load_checkpoint(Path(cfg.resume))
        check_resumable(ckpt, cfg.to_flower(), dict(global_arrays))
        global_arrays = type(global_arrays)((n, ckpt.arrays[n]) for n in global_arrays)
        set_trainable(model, global_arrays)
        rng, first_round, lineage = ckpt.rng(), ckpt.server_round + 1, [*ckpt.lineage, ckpt.run_id]
        if ckpt.strategy_state:
            server_opt = ServerOptimizer.from_state_dict(ckpt.strategy_state)
        history = {
            **ckpt.history,
            "run_id": run_id,
            "config": cfg.to_flower(),
            "resumed_from": lineage,
            "majority_baseline": majority,
        }
        center = (history.get("feature_centering") or {}).get("center")
        if center is not None:
            set_feature_center(model, np.asarray(center, dtype=np.float32))
        previous_best = Path(cfg.resume) / BEST_ADAPTER_DIR
        if history.get("best") and previous_best.is_dir():  # the best round so far may be an earlier run's
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(previous_best, run_dir / BEST_ADAPTER_DIR, dirs_exist_ok=True)
            history["best"] = {**history["best"], "dir": str(run_dir / BEST_ADAPTER_DIR)}
        elif history.get("best"):
            logger.warning("%s is missing: the best round will be chosen among the resumed rounds", previous_best)
            history.pop("best")
        logger.info("resuming run %s after its round %d (checkpoint in %s)", ckpt.run_id, ckpt.server_round, cfg.resume)
    card = {
        "base_model": cfg.model_path,
        "classifier_pooling": cfg.classifier_pooling,
        "label_names": label_names,
        "max_length": cfg.max_length,
    }
    durations: list[float] = []
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        started = time.monotonic()
        nodes = wait_for_nodes(grid, cfg.min_train_nodes)
        sampled = sample_nodes(nodes, cfg, rng)
        content = RecordDict(
            {
                C.GLOBAL_RECORD: record_from_arrays(global_arrays),
                C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: run_id}),
            }
        )
        if cfg.center_features:
            content[C.CENTER_RECORD] = record_from_arrays({C.CENTER_ARRAY: get_feature_center(model)})
        expected = float(np.median(durations)) if durations else None
        with RoundProgress(f"round {server_round}/{cfg.num_server_rounds}", expected_s=expected):
            agg = _aggregate(
                grid,
                cfg,
                node_ids=sampled,
                content=content,
                server_round=server_round,
                run_id=run_id,
                dim=dim,
                roster=roster,
            )
        if agg.total is None and not agg.aborted:
            agg.aborted, agg.abort_reason = True, "no site contributed an update"
        if agg.total is not None and agg.total_weight > 0:
            mean = mean_from_sum(agg.total, agg.total_weight)
            global_arrays = unflatten(flatten(global_arrays) + server_opt.step(mean), global_arrays)
            set_trainable(model, global_arrays)
        test_metrics = evaluate_model(model, test_enc, num_classes=len(data.label_names))
        seconds = time.monotonic() - started
        durations.append(seconds)
        warnings = quality_warnings(test_metrics, majority, label_names)
        best = history.get("best")
        if not agg.aborted and (best is None or test_metrics[BEST_BY] > best["test"][BEST_BY]):
            # the best round so far, by the server's held-out test set (no site's data: no privacy cost)
            best_dir = save_adapter(
                fold_feature_center(model),
                run_dir,
                card={**card, "round": server_round, "adapter": "best", "test": test_metrics},
                name=BEST_ADAPTER_DIR,
            )
            history["best"] = {"round": server_round, "by": BEST_BY, "test": test_metrics, "dir": str(best_dir)}

        site = partial(_site_name, agg)
        clients = _client_epsilons(agg)
        losses = _train_losses(agg)
        epsilons = [m[C.METRIC_EPSILON] for m in agg.client_metrics.values() if C.METRIC_EPSILON in m]
        survivors = [site(n) for n in agg.survivors]
        dropped = [site(n) for n in agg.dropped]
        declined = {site(n): agg.decline_reasons.get(n, "") for n in agg.declined}
        round_record: dict[str, Any] = {
            "round": server_round,
            "test": test_metrics,
            "clients": clients,
            "sampled": [site(n) for n in sampled],
            "survivors": survivors,
            "dropped": dropped,
            "declined": declined,
            "aborted": agg.aborted,
            "abort_reason": agg.abort_reason,
            "secure_aggregation": cfg.secure_aggregation,
            "dp_noise": cfg.dp_noise,
            "seconds": seconds,
        }
        if losses:  # a non-private round: the sites' exact mean train loss (a DP round releases none)
            round_record["train_loss"] = float(np.mean(losses))
        history["rounds"].append(round_record)
        run_ledger.record_round(
            server_round,
            participants=[site(n) for n in sampled],
            declined=declined,
            survivors=survivors,
            dropped=dropped,
            aborted=agg.aborted,
            aggregate_hash=digest_array(agg.total) if agg.total is not None else None,
            attestations={site(n): att for n, att in agg.attestations.items()},
            metrics=test_metrics,
            secure_aggregation=cfg.secure_aggregation,
            dp_noise=cfg.dp_noise if cfg.dp else None,
        )
        write_json_atomic(run_dir / METRICS_FILE, history)
        records = run_ledger.records()
        monitor.record_round(records[-1], seconds=seconds)
        save_checkpoint(
            run_dir,
            Checkpoint(
                run_id=run_id,
                lineage=lineage,
                server_round=server_round,
                config=cfg.to_flower(),
                rng_state=dict(rng.bit_generator.state),
                history=history,
                run_ledger_head=records[-1]["entry_hash"] if records else None,
                arrays=dict(global_arrays),
                strategy_state=server_opt.state_dict(),
            ),
        )
        for node, reason in agg.decline_reasons.items():
            logger.warning("round %d: %s declined: %s", server_round, site(node), reason)
        note = ""
        if agg.aborted:
            note = f" | ABORTED: {agg.abort_reason}"
        elif agg.dropped or agg.declined:
            note = f" | {len(survivors)}/{len(sampled)} sites ({len(dropped)} dropped, {len(declined)} declined)"
        if losses:
            note += f" | NON-PRIVATE train loss {round_record['train_loss']:.4f}"
        if warnings:
            note += " | WARNING: " + "; ".join(warnings)
        logger.info(
            "round %d/%d | test loss %.4f acc %.4f f1 %.4f (majority %.4f / %.4f) | best round %s | max eps %s | "
            "%.1fs%s",
            server_round,
            cfg.num_server_rounds,
            test_metrics["loss"],
            test_metrics["accuracy"],
            test_metrics["macro_f1"],
            majority["accuracy"],
            majority["macro_f1"],
            history["best"]["round"] if history.get("best") else "-",
            _fmt_eps(epsilons),
            seconds,
            note,
        )
        if agg.aborted and cfg.secure_aggregation and cfg.secagg_on_abort == "stop":
            raise RuntimeError(f"round {server_round} aborted ({agg.abort_reason}) and secagg-on-abort = 'stop'")

    final_test = history["rounds"][-1]["test"] if history["rounds"] else baseline
    final_round = history["rounds"][-1]["round"] if history["rounds"] else 0
    adapter_dir = save_adapter(
        fold_feature_center(model),  # the head takes the plain pooled vector: the base model has no center
        run_dir,
        card={**card, "round": final_round, "adapter": "final", "test": final_test, "final_test": final_test},
        name=ADAPTER_DIR,
    )
    history["adapter_dir"] = str(adapter_dir)
    history["adapters"] = {"final": {"dir": str(adapter_dir), "round": final_round, "test": final_test}}
    if history.get("best"):
        best = history["best"]
        history["adapters"]["best"] = {"dir": best["dir"], "round": best["round"], "by": BEST_BY, "test": best["test"]}
    final_warnings = quality_warnings(final_test, majority, label_names)
    history["final_warnings"] = final_warnings
    for warning in final_warnings:
        logger.warning("WARNING: the final model %s", warning)
    if final_warnings and history.get("best") and history["best"]["test"][BEST_BY] > final_test[BEST_BY]:
        logger.warning(
            "WARNING: round %d did better (macro-F1 %.4f); its adapter is %s",
            history["best"]["round"],
            history["best"]["test"][BEST_BY],
            history["best"]["dir"],
        )
    publish_adapter(  # the export plain transformers code loads, and the model card (README.md)
        adapter_dir,
        fold_feature_center(model),
        history=history,
        run_records=run_ledger.records(),
        data_path=cfg.data_path,
        tokenizer=load_tokenizer(cfg.model_path),
    )
    if scorer is not None:
        scorer.finish(model, run_dir, run_id=run_id, seed=cfg.seed, delta=cfg.delta)
    write_json_atomic(run_dir / METRICS_FILE, history)
    monitor.close()
    logger.info("final adapter saved to %s (round %d); metrics in %s", adapter_dir, final_round, run_dir / METRICS_FILE)
    if history.get("best"):
        best = history["best"]
        logger.info(
            "best-round adapter saved to %s (round %d, macro-F1 %.4f on the server's held-out test set)",
            best["dir"],
            best["round"],
            best["test"][BEST_BY],
        )
