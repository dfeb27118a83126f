"""The ServerApp: sample sites, aggregate their updates (securely by default), apply, evaluate, record, repeat.

The loop is the same for every task (:mod:`shared.tasks`): what differs (the rows, the model, the metrics, the
saved adapter) is the task's, and what only some tasks can do (round 0's feature centering, the canary audit)
is an optional capability of the task. One concept per file:

- ``server/sampling.py``: waiting for the sites, sampling a round's cohort;
- ``server/aggregation.py``: the round's sum (secure or plain) and the server optimizer's step from it;
- ``server/centering.py``: round 0 of a centered run;
- ``server/evaluation.py``: the held-out rows, each round's test metrics, the best round and its adapter;
- ``server/recording.py``: metrics.json, the run ledger, the monitor, the checkpoint, the progress line;
- ``server/resume.py``: continuing an interrupted run from its checkpoint.

Aggregation is sum-then-divide with weights fixed before the round (weight 1 per surviving site), so the
server never needs any site's example count and can work from the sum alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from server.aggregation import INSECURE_WARNING, aggregate, apply_update
from server.centering import CENTER_MAX_ERROR, center_error, center_is_usable, center_round
from server.evaluation import HeldOut, update_best
from server.monitoring import RunMonitor
from server.optimizer import ServerOptimizer
from server.outputs import ADAPTER_DIR, METRICS_FILE
from server.recording import RunRecorder, log_round
from server.resume import resume_run
from server.run_ledger import RunLedger
from server.sampling import NODE_SETTLE_S, sample_nodes, wait_for_nodes
from shared import constants as C
from shared.config import ConfigError, RunConfig
from shared.identity import Roster, provision_simulation
from shared.ledger import RUN_LEDGER_FILE
from shared.log import RoundProgress, configure_logging
from shared.metrics import divergence_warnings
from shared.model import flatten, get_trainable
from shared.records import record_from_arrays
from shared.tasks import get_task
from shared.tasks.base import CanaryAudit, CanaryScoring, FeatureCentering, Task

__all__ = ["CENTER_MAX_ERROR", "app", "center_error", "center_is_usable", "main", "wait_for_nodes"]

logger = logging.getLogger("privatune")

app = ServerApp()


def warn_about_settings(cfg: RunConfig) -> None:
    """The loud warnings a run that gives up a guarantee starts with."""
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


def capabilities(cfg: RunConfig, task: Task) -> tuple[FeatureCentering | None, CanaryAudit | None]:
    """The task's capabilities this run uses (None: not asked for); a ConfigError if it asks for one the task
    lacks."""
    if cfg.center_features and task.centering is None:
        raise ConfigError(f"center-features = true: task {task.name!r} has no feature centering; set it false")
    text_canaries = bool(cfg.canaries) and cfg.canary_kind == "text"
    if text_canaries and task.canary_audit is None:
        raise ConfigError(
            f"canaries = {cfg.canaries}, canary-kind = 'text': task {task.name!r} has no text canaries; "
            "use canary-kind = 'gradient'"
        )
    return (task.centering if cfg.center_features else None), (task.canary_audit if text_canaries else None)


def start_canaries(
    cfg: RunConfig, canary_audit: CanaryAudit | None, model: nn.Module, rows: Any, *, num_sites: int, run_id: str
) -> CanaryScoring | None:
    """The server's side of canary mode (None when off): gradient canaries (task-independent, their sites'
    records read at the end) or the task's text canaries (scored with the initial model now)."""
    if cfg.canaries and cfg.canary_kind == "gradient":
        from shared.gradient_canaries import GradientCanaryScorer

        return GradientCanaryScorer.start(
            canaries=cfg.canaries, seed=cfg.seed, num_sites=num_sites, sim_dir=cfg.simulation_dir(run_id)
        )
    return canary_audit.start(model, cfg, rows, num_sites=num_sites) if canary_audit else None


def round_content(
    global_arrays: dict[str, np.ndarray],
    *,
    server_round: int,
    run_id: str,
    model: nn.Module,
    centering: FeatureCentering | None,
) -> RecordDict:
    """What every sampled site gets: the global trainable tensors, the round, and the feature center if any."""
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(global_arrays),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: run_id}),
        }
    )
    if centering is not None:
        content[C.CENTER_RECORD] = record_from_arrays({C.CENTER_ARRAY: centering.get_center(model)})
    return content


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    task = get_task(cfg)
    run_id = str(context.run_id)
    run_dir = cfg.run_dir(run_id)
    warn_about_settings(cfg)
    centering, canary_audit = capabilities(cfg, task)
    if cfg.resume and not cfg.roster_path and not cfg.sim_dir:
        raise ConfigError("resume in a simulation needs sim-dir set: the sites' ledgers must outlive the restart")
    nodes = wait_for_nodes(grid, cfg.min_train_nodes, settle_s=NODE_SETTLE_S)

    # the rows and the model load before anything is written: a bad path or column leaves no run dir and no keys
    held_out = HeldOut.load(task, cfg, num_sites=len(nodes))
    model = task.fresh_model(cfg, held_out.rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    roster: Roster | None
    if cfg.roster_path:  # deployment: sites were provisioned beforehand (privatune provision)
        roster = Roster.load(Path(cfg.roster_path).expanduser())
    else:  # simulation: the simulated sites' identities are made at start-up
        roster = provision_simulation(cfg.simulation_dir(run_id), len(nodes))
    global_arrays = get_trainable(model)
    dim = int(flatten(global_arrays).shape[0])
    logger.info(
        "run %s: task %s, %d sites, %d rounds, %s, %d trainable parameters, test set %d rows, DP %s, "
        "secure aggregation %s",
        run_id,
        task.name,
        len(nodes),
        cfg.num_server_rounds,
        "FFA-LoRA" if cfg.lora_mode == "ffa" else "plain LoRA",
        dim,
        len(held_out.rows),
        (
            f"on, {cfg.dp_noise} noise ("
            + (
                f"target epsilon {cfg.target_epsilon:g}: each site calibrates its noise multiplier"
                if cfg.target_epsilon > 0
                else f"noise multiplier {cfg.noise_multiplier:g}"
            )
            + f", delta {cfg.delta:g})"
        )
        if cfg.dp
        else "OFF",  # fmt: skip
        "on" if cfg.secure_aggregation else "OFF",
    )
    scorer = start_canaries(cfg, canary_audit, model, held_out.rows, num_sites=len(nodes), run_id=run_id)
    recorder = RunRecorder(
        cfg,
        run_id,
        run_dir,
        history={"run_id": run_id, "config": cfg.to_flower(), **task.history_fields(held_out.rows, held_out.reference)},
        run_ledger=RunLedger(run_dir / RUN_LEDGER_FILE, run_id, roster=roster),
        monitor=RunMonitor(run_id, port=cfg.metrics_port),  # Prometheus metrics (metrics-port; 0 = not served)
    )

    # round 0: the centering query (a resumed run takes the center from its checkpoint), the untrained model
    centered: tuple[dict[str, Any], Any] | None = None
    if centering is not None and not cfg.resume:
        with RoundProgress("round 0 (feature centering)"):
            centered = center_round(grid, cfg, nodes, model, centering, global_arrays, run_id, roster)
    baseline = held_out.evaluate(model)
    rng = np.random.default_rng([cfg.seed, 0x5A3])
    server_opt = ServerOptimizer(kind=cfg.server_optimizer, learning_rate=cfg.server_learning_rate, tau=cfg.server_tau)
    first_round = 1
    if cfg.resume:  # continue an interrupted run from its last checkpointed round, under this new run id
        resumed = resume_run(
            cfg,
            run_id=run_id,
            run_dir=run_dir,
            model=model,
            global_arrays=global_arrays,
            server_opt=server_opt,
            history=recorder.history,
            centering=centering,
        )
        global_arrays, rng, first_round, server_opt = (
            resumed.arrays,
            resumed.rng,
            resumed.first_round,
            resumed.server_opt,
        )
        recorder.history, recorder.lineage = resumed.history, resumed.lineage
    else:
        recorder.history.update({"initial_test": baseline, "rounds": []})
    if centered is not None:
        record, agg = centered
        recorder.history["feature_centering"] = record
        recorder.ledger_round(0, agg, record, baseline)
        recorder.monitor.record_round(recorder.run_ledger.records()[-1], seconds=record["seconds"])
    logger.info("round 0 | %s (before training)", task.describe(baseline, held_out.reference))

    history = recorder.history
    card = {"base_model": cfg.model_path, "max_length": cfg.max_length}  # the task adds its own fields
    durations: list[float] = []
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        started = time.monotonic()
        sampled = sample_nodes(wait_for_nodes(grid, cfg.min_train_nodes), cfg, rng)
        content = round_content(
            global_arrays, server_round=server_round, run_id=run_id, model=model, centering=centering
        )
        expected = float(np.median(durations)) if durations else None
        with RoundProgress(f"round {server_round}/{cfg.num_server_rounds}", expected_s=expected):
            agg = aggregate(
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
        global_arrays = apply_update(agg, global_arrays, server_opt, model)
        test = held_out.evaluate(model)
        seconds = time.monotonic() - started
        durations.append(seconds)
        update_best(
            history, task, model, run_dir=run_dir, card=card, server_round=server_round, test=test, aborted=agg.aborted
        )
        record = recorder.record_round(server_round, sampled=sampled, agg=agg, test=test, seconds=seconds)
        recorder.checkpoint(server_round, rng=rng, arrays=global_arrays, server_opt=server_opt)
        log_round(
            server_round,
            cfg,
            record=record,
            agg=agg,
            metrics=task.describe(test, held_out.reference),
            warnings=model_warnings(task, test, held_out, baseline),
            best_round=history["best"]["round"] if history.get("best") else None,
        )
        if agg.aborted and cfg.secure_aggregation and cfg.secagg_on_abort == "stop":
            raise RuntimeError(f"round {server_round} aborted ({agg.abort_reason}) and secagg-on-abort = 'stop'")

    finish(task, cfg, recorder, model, held_out, card=card, baseline=baseline)
    if scorer is not None:
        scorer.finish(model, run_dir, run_id=run_id, seed=cfg.seed, delta=cfg.delta)
    recorder.write()
    recorder.monitor.close()
    from shared.simulation import summary  # the closing lines privatune simulate and flwr run --stream both show

    for line in summary(run_dir).splitlines():
        logger.info("%s", line)


def model_warnings(task: Task, test: dict[str, Any], held_out: HeldOut, baseline: dict[str, Any]) -> list[str]:
    """What a round's line and the final summary warn about a model: the task's own warnings on its held-out
    metrics (one class, below the majority), and a loss that has risen well above the untrained model's."""
    return task.warnings(test, held_out.reference, held_out.rows) + divergence_warnings(test, baseline)


def best_round_model(task: Task, cfg: RunConfig, held_out: HeldOut, adapter_dir: Path) -> nn.Module:
    """The model of the best round, rebuilt from its saved adapter: the run's fresh model (a classifier's center
    at zero: the saved head has it folded into its bias) with the adapter's weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = task.fresh_model(cfg, held_out.rows)
    result: Any = set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise RuntimeError(f"{adapter_dir}: adapter weights the run's model has no place for: {result.unexpected_keys}")
    return model


def finish(
    task: Task,
    cfg: RunConfig,
    recorder: RunRecorder,
    model: nn.Module,
    held_out: HeldOut,
    *,
    card: dict[str, Any],
    baseline: dict[str, float],
) -> None:
    """Save and publish the final adapter, name both adapters in the history, and warn about the final model."""
    history, run_dir = recorder.history, recorder.run_dir
    final_test = history["rounds"][-1]["test"] if history["rounds"] else baseline
    final_round = history["rounds"][-1]["round"] if history["rounds"] else 0
    adapter_dir = task.save_adapter(
        model,
        run_dir / ADAPTER_DIR,
        card={**card, "round": final_round, "adapter": "final", "test": final_test, "final_test": final_test},
    )
    history["adapter_dir"] = str(adapter_dir)
    history["adapters"] = {"final": {"dir": str(adapter_dir), "round": final_round, "test": final_test}}
    best = history.get("best")
    if best:
        history["adapters"]["best"] = {k: best[k] for k in ("dir", "round", "by", "test")}
    final_warnings = model_warnings(task, final_test, held_out, baseline)
    history["final_warnings"] = final_warnings
    for warning in final_warnings:
        logger.warning("WARNING: the final model %s", warning)
    if final_warnings and best and task.score(best["test"]) > task.score(final_test):
        logger.warning(
            "WARNING: round %d did better (%s %.4f); its adapter is %s",
            best["round"],
            task.best_by,
            best["test"][task.best_by],
            best["dir"],
        )
    records = recorder.run_ledger.records()
    task.publish(adapter_dir, model, cfg=cfg, history=history, run_records=records)
    if best:  # the best-round adapter is as usable without this project as the final one (export, model card)
        best_model = model if best["round"] == final_round else best_round_model(task, cfg, held_out, Path(best["dir"]))
        task.publish(Path(best["dir"]), best_model, cfg=cfg, history=history, run_records=records)
    logger.info("final adapter saved to %s (round %d); metrics in %s", adapter_dir, final_round, run_dir / METRICS_FILE)
    if best:
        logger.info(
            "best-round adapter saved to %s (round %d, %s %.4f on the server's held-out test set)",
            best["dir"],
            best["round"],
            best["by"],
            best["test"][best["by"]],
        )
