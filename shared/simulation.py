"""Run the whole federation on one machine with Flower's simulation runtime, in this process.

``flwr run .`` works too (see the README); this path adds what it lacks for a one-line experiment: good
defaults, Flower's telemetry / update check / runtime installs switched off, FLWR_HOME and Ray's temp dir in a
temp dir that is removed afterwards, one progress line per round (and a "still running" line with an ETA inside
one), no process left running, and the data, model and resume checkpoint checked before Flower and Ray start; a
run that fails before any site recorded anything leaves no run directory and no keys behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import ConfigError, RunConfig
from shared.identity import site_id_for_partition
from shared.log import configure_logging
from shared.site import LEDGER_FILE, write_site_settings

if TYPE_CHECKING:
    from client.round_time import RunTimeEstimate

PROJECT_ROOT = Path(__file__).resolve().parents[1]

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def offline_environment() -> None:
    """Switch off every default that would call out or install at run time (here and in Ray workers)."""
    os.environ.update(FLOWER_ENV)


FLOWER_TELEMETRY_WAIT_S = 5.0  # at most this long for Flower's exit event to be done with FLWR_HOME
SMALL_SITE_ROWS = 100  # below this many training rows per site, local DP noise drowns a site's update (a warning)


def preflight(
    cfg: RunConfig,
    *,
    num_clients: int,
    device: str | None = None,
    estimate_time: bool = False,
    cpus_per_client: float = 1.0,
) -> RunTimeEstimate | None:
    """What would otherwise fail 10-60 s into a run, checked in this process before Flower and Ray start, through
    the run's task: the data file (the classifier: its columns and labels), that it splits over ``num_clients``
    sites, the server's evaluation file, the model path, and the checkpoint to resume from. Raises ``ValueError``
    (a ``DataError``, ``ModelError``, ``ConfigError``...) naming what is wrong. With ``estimate_time``, once all
    of that holds, it logs how long the run will take on this machine and returns the estimate
    (:func:`log_time_estimate`)."""
    from shared.federation import simulated_split
    from shared.tasks import get_task

    if num_clients < cfg.min_train_nodes:
        raise ValueError(f"num_clients={num_clients} is below min-train-nodes={cfg.min_train_nodes}")
    from shared.partition import PartitionError

    task = get_task(cfg)
    data = task.load_run_rows(cfg)
    try:
        parts, _ = simulated_split(cfg, data, num_clients)
    except PartitionError as e:
        raise ValueError(f"{data.source}: {len(data)} rows at {num_clients} sites: {e}") from e
    smallest = min(len(p) for p in parts)
    if smallest == 0:
        raise ValueError(f"{data.source}: {len(data)} rows leave a site with no training rows at {num_clients} sites")
    if cfg.dp and cfg.dp_noise == "local" and smallest < SMALL_SITE_ROWS:
        logging.getLogger("privatune").warning(
            "WARNING: the smallest of the %d sites holds %d training rows: under local DP noise a site this small "
            "sends mostly noise, and the run may end little above the majority class (docs/benchmarks.md: 42 rows "
            "per site gained 3-8 points, 140 gained 15-20). Fewer sites with more rows each learn more.",
            num_clients,
            smallest,
        )
    if cfg.eval_data_path:
        task.load_eval_rows(cfg)
    task.check_model(cfg)
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA device on this machine")
    if cfg.resume:
        from server.checkpoint import load_checkpoint

        if not cfg.sim_dir:
            raise ConfigError("resume in a simulation needs sim-dir set: the sites' ledgers must outlive the restart")
        load_checkpoint(Path(cfg.resume))
    if not estimate_time:
        return None
    return log_time_estimate(
        cfg, task, data, parts, num_clients=num_clients, device=device, cpus_per_client=cpus_per_client
    )


LONG_ROW_TOKENS = 64  # rows this long on average: the estimate says that long texts cost more, and what helps
CUT_ROWS_SHARE = 0.25  # this share of rows cut at max-length or more: the estimate names the longer setting
MODEL_MAX_LENGTH_HINT = 256  # the builtin encoder's own limit (all-MiniLM-L6-v2: 256 word pieces)
LONG_TEXT_LEVER_ROWS = 200  # sites this large gained from more, smaller DP steps on long texts (docs/benchmarks.md)


def log_time_estimate(
    cfg: RunConfig,
    task: Any,
    data: Any,
    parts: list[Any],
    *,
    num_clients: int,
    device: str | None,
    cpus_per_client: float,
) -> RunTimeEstimate:
    """Log the run's estimated time on this machine (``client.round_time``): the data's token lengths and a timed
    DP step and evaluation on a few rows (a few seconds; longer for a large model)."""
    import numpy as np

    from client.round_time import RunPlan, estimate, measure_speed
    from shared.batching import row_lengths
    from shared.federation import server_test_set

    log = logging.getLogger("privatune")
    rng = np.random.default_rng(cfg.seed)
    training = np.concatenate(parts)
    sample = rng.permutation(training)[:2000]  # lengths of up to 2,000 training rows, in random order
    lengths = row_lengths(task.encode(cfg, data.subset(np.sort(sample))).attention_mask).numpy()
    lengths = lengths[rng.permutation(lengths.size)]
    test = server_test_set(cfg, data, num_clients)
    speed = measure_speed(cfg, task, data.subset(training), test, device=device or "cpu", seed=cfg.seed)
    plan = RunPlan(
        site_rows=[len(p) for p in parts],
        lengths=lengths,
        test_rows=len(test),
        rounds=cfg.num_server_rounds,
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        centering=cfg.center_features and task.centering is not None and not cfg.resume,
        parallel_sites=min(num_clients, max(1, int((os.cpu_count() or 1) // max(cpus_per_client, 1e-9)))),
    )
    result = estimate(plan, speed)
    log.info("%s", result.describe())
    if result.mean_tokens >= LONG_ROW_TOKENS:
        log.info(
            "long texts cost more: a DP step's time grows with its rows' tokens (max-length %d cuts each row there; "
            "a lower max-length or fewer rounds shorten the run, at some cost in accuracy)",
            cfg.max_length,
        )
        cut = float(np.mean(lengths >= cfg.max_length))
        if cut >= CUT_ROWS_SHARE and cfg.max_length < MODEL_MAX_LENGTH_HINT:
            log.info(
                "%.0f%% of the rows are cut at max-length %d: --set max-length=%d reads more of each (the centralized "
                "probe on 180-word speeches: 0.693 at 128, 0.763 at 256, docs/benchmarks.md), at up to twice the time",
                100 * cut,
                cfg.max_length,
                MODEL_MAX_LENGTH_HINT,
            )
        defaults = RunConfig()
        if (
            cfg.task == "classify"  # measured for the classifier's head only (docs/benchmarks.md)
            and (cfg.batch_size, cfg.local_steps) == (defaults.batch_size, defaults.local_steps)
            and min(plan.site_rows) >= LONG_TEXT_LEVER_ROWS
        ):
            log.info(
                "long texts, %d+ rows per site: --set batch-size=128 --set local-steps=8 (the same rows per round "
                "for sites of 256 rows or more) ended 8-10 points higher on the long-text set of docs/benchmarks.md "
                "and level on short texts",
                LONG_TEXT_LEVER_ROWS,
            )
    return result


TRAINING_WAIT_MARGIN = 3.0  # the server waits this many times the estimated training of a round, at least
TRAINING_STAGE_FACTOR = 4  # server/aggregation.py: the stage that includes local training waits 4 x secagg-timeout


def timeout_for(cfg: RunConfig, estimate: RunTimeEstimate) -> float | None:
    """A ``secagg-timeout`` under which the server waits long enough for the sites' training (the estimate's
    training seconds, :data:`TRAINING_WAIT_MARGIN` times over), or None when the run's own one does: on long
    texts or a slow machine a round's training can outlast the default's 480 s, and every round would abort."""
    needed = TRAINING_WAIT_MARGIN * estimate.training_seconds / TRAINING_STAGE_FACTOR
    if needed <= cfg.secagg_timeout:
        return None
    return float(60 * math.ceil(needed / 60))


def await_flower_telemetry(timeout_s: float = FLOWER_TELEMETRY_WAIT_S) -> None:
    """Wait until Flower's telemetry has read (or made) its source id file, ``$FLWR_HOME/source``.

    flwr 1.41's simulation fires its exit event as it ends, success or failure, telemetry on or off, from a daemon
    thread; the first event of a process creates ``$FLWR_HOME`` and that file. Removing FLWR_HOME before the thread
    got there left an empty-looking ``privatune-*/flwr/source`` in the temp directory. Once the id is read it is
    kept in memory and later events touch no file. Bounded by ``timeout_s`` (a runtime that fired no event)."""
    from flwr.supercore import telemetry

    deadline = time.monotonic() + timeout_s
    while telemetry.state["source"] is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _recorded_anything(run_dir: Path) -> bool:
    """Whether a failed run left a record that must be kept: its metrics, or a site ledger with an entry."""
    if (run_dir / "metrics.json").is_file():
        return True
    return any(p.stat().st_size > 0 for p in run_dir.rglob(LEDGER_FILE))


def discard_failed_run(cfg: RunConfig, run_id: int | str) -> bool:
    """Remove the run dir of a run that failed before anything was recorded (its keys, roster, empty ledgers:
    nothing a later run or an audit needs). A run dir holding metrics or a site ledger entry is kept, and so is
    an explicit ``sim-dir`` outside it (its sites persist across runs). True if removed."""
    run_dir = cfg.run_dir(run_id)
    if not run_dir.is_dir() or _recorded_anything(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def run_simulation(
    overrides: Mapping[str, Any],
    *,
    num_clients: int,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    site_settings: Mapping[str, Any] | None = None,
    num_gpus_per_client: float = 0.0,
    estimate_time: bool = False,
) -> Path:
    """Simulate ``num_clients`` sites with the run config ``overrides`` (kebab-case keys); returns the run dir.

    ``site_settings`` go to every simulated site's ``site.toml`` (its budget, its ``device``);
    ``num_gpus_per_client`` is what Ray reserves for each: a share of one GPU (``privatune simulate --device cuda``
    asks ``1 / num_clients``, so that all sites train at once on the one GPU). Ray then shows each site's worker
    only the GPU it was given (``CUDA_VISIBLE_DEVICES``), as ``cuda:0``: the device to name is ``cuda``."""
    offline_environment()
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **overrides})  # validate before starting anything
    device = str((site_settings or {}).get("device", "cpu"))
    if num_gpus_per_client > 0 and device not in ("cuda", "cuda:0"):
        raise ValueError(f"device {device!r}: a simulated site sees only the GPU Ray gave it, as cuda: use 'cuda'")
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise RuntimeError(f"{PROJECT_ROOT} has no pyproject.toml: install PrivaTune editable (pip install -e .)")
    configure_logging(verbose=verbose)
    estimate = preflight(
        cfg,
        num_clients=num_clients,
        device=(site_settings or {}).get("device"),
        estimate_time=estimate_time,
        cpus_per_client=cpus_per_client,
    )
    longer = timeout_for(cfg, estimate) if estimate is not None and "secagg-timeout" not in overrides else None
    if longer is not None:  # left at its default, the wait would cut the sites' training short: every round aborts
        logging.getLogger("privatune").info(
            "secagg-timeout %.0f s -> %.0f s for this run: the server waits %d x secagg-timeout for the sites' "
            "training, estimated at about %.0f s a round here (set secagg-timeout to choose)",
            cfg.secagg_timeout,
            longer,
            TRAINING_STAGE_FACTOR,
            estimate.training_seconds if estimate is not None else 0.0,
        )
        cfg = RunConfig.from_flower({**cfg.to_flower(), "secagg-timeout": longer})
    logging.getLogger("privatune").info(
        "starting %d simulated sites (Flower, Ray); loading the model takes a while", num_clients
    )

    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    import client.app
    import server.app

    # The same Run set-up flwr.simulation.run_simulation does, plus our run config (flwr 1.41 internals).
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    if not cfg.sim_dir:  # name the sites' home explicitly, so that `privatune resume` finds the same sites
        cfg = RunConfig.from_flower({**cfg.to_flower(), "sim-dir": str(cfg.simulation_dir(run_id))})
    run.override_config = dict(cfg.to_flower())
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    if site_settings:  # each simulated site's own settings (its budget), which the server never sees
        for i in range(num_clients):
            write_site_settings(cfg.simulation_dir(run_id) / "sites" / site_id_for_partition(i), site_settings)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    cpus = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="privatune-"))
    flwr_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(scratch / "flwr")
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": {
            "num_cpus": cpus,
            "logging_level": "WARNING" if verbose else "ERROR",
            "log_to_driver": verbose,
            "_temp_dir": str(scratch / "ray"),
            "_node_ip_address": "127.0.0.1",  # Ray's own traffic stays on loopback
        },
    }
    try:
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client.app.app,
            server_app=server.app.app,
            backend_name="ray",
            backend_config=backend,  # type: ignore[arg-type]  # flwr's alias is narrower than its parser
            server_app_context=context,
            app_dir=str(PROJECT_ROOT),
            run=run,
            is_app=True,  # clients fuse their run config from app_dir's pyproject + run.override_config
            verbose_logging=verbose,
        )
    finally:
        await_flower_telemetry()  # or its thread makes scratch/flwr/source again after the removal
        shutil.rmtree(scratch, ignore_errors=True)
        if flwr_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = flwr_home
        removed = discard_failed_run(cfg, run_id)  # only if nothing was recorded (no metrics, no ledger entry)
    run_dir = cfg.run_dir(run_id)
    if not (run_dir / "metrics.json").is_file():
        raise RuntimeError(
            "the simulation ended without writing metrics.json; see the log above"
            + (f" ({run_dir} held nothing recorded and was removed)" if removed else f" (kept: {run_dir})")
        )
    return run_dir


def summary(run_dir: Path) -> str:
    """The run's result as a person reads it: majority baseline, final and best round (a classifier's with each
    label's recall), warnings, epsilon."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["rounds"][-1] if metrics["rounds"] else None
    lines = [f"run {metrics['run_id']} -> {run_dir}"]
    majority = metrics.get("majority_baseline")
    if majority:
        names = metrics.get("label_names") or []
        name = names[int(majority["class"])] if int(majority["class"]) < len(names) else majority["class"]
        lines.append(
            f"majority baseline (always {name!r}): accuracy {majority['accuracy']:.4f}  "
            f"macro-F1 {majority['macro_f1']:.4f}"
        )
    if last:
        lines.append(f"final test (round {last['round']}): {_shown_metrics(last['test'])}")
        lines += _recall_line(last["test"])
    best = metrics.get("best")
    if best:
        by = str(best.get("by", "macro_f1"))
        lines.append(
            f"best round {best['round']} (by {_METRIC_NAMES.get(by, by)} on the server's held-out test set): "
            f"{_shown_metrics(best['test'], _BEST_SHOWN)}"
        )
        if not last or best["round"] != last["round"]:
            lines += _recall_line(best["test"])
    for warning in metrics.get("final_warnings") or []:
        lines.append(f"WARNING: the final model {warning}")
    if metrics.get("final_warnings") and best and last:
        from shared.tasks import get_task

        score = get_task(str(metrics["config"].get("task", "classify"))).score
        if score(best["test"]) > score(last["test"]):
            lines.append(f"WARNING: round {best['round']} did better: use the best-round adapter below")
    eps: dict[str, Any] = {}
    for r in metrics["rounds"]:
        for site, m in r["clients"].items():
            eps[site] = m["epsilon"]
    if eps:
        shown = ", ".join(f"{s}={'inf' if v is None else f'{v:.3f}'}" for s, v in sorted(eps.items()))
        lines.append(f"cumulative epsilon per site (delta {metrics['config']['delta']:g}): {shown}")
    adapters = metrics.get("adapters") or {}
    if "final" in adapters:
        lines.append(f"final adapter (round {adapters['final']['round']}): {adapters['final']['dir']}")
    else:
        lines.append(f"adapter: {metrics.get('adapter_dir')}")
    if "best" in adapters:
        lines.append(f"best-round adapter (round {adapters['best']['round']}): {adapters['best']['dir']}")
    return "\n".join(lines)


# how summary() names and orders a round's test metrics (any task's; others follow in their own order)
_METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "precision": "precision", "recall": "recall"}
_SHOWN_FIRST = ("accuracy", "macro_f1", "precision", "recall", "loss")
_BEST_SHOWN = ("accuracy", "macro_f1")
_NOT_SHOWN = ("top_class", "top_class_share", "top_answer", "top_answer_share")  # the warnings say what matters


def _recall_line(test: dict[str, Any]) -> list[str]:
    """``  recall per label: 'neg' 0.2251 (77 of 342)  'pos' 0.9782 (450 of 460)``: a classifier's recall of each
    label (``per_class``) under its test line; nothing for a task without it."""
    per_class = test.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return []
    shown = "  ".join(f"{name!r} {c['recall']:.4f} ({c['found']} of {c['rows']})" for name, c in per_class.items())
    return [f"  recall per label: {shown}"]


def _shown_metrics(test: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """``accuracy 0.7431  macro-F1 0.7289 ...``: the test metrics in summary()'s order, 4 decimals."""
    names = keys or (*[k for k in _SHOWN_FIRST if k in test], *[k for k in test if k not in _SHOWN_FIRST])
    shown = [k for k in names if k in test and k not in _NOT_SHOWN and isinstance(test[k], (int, float))]
    if keys is not None and not shown:  # a task without these: its own metrics
        return _shown_metrics(test)
    return "  ".join(f"{_METRIC_NAMES.get(k, k)} {float(test[k]):.4f}" for k in shown)
