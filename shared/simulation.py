"""Run the whole federation on one machine with Flower's simulation runtime, in this process.

``flwr run .`` works too (see the README); this path adds what it lacks for a one-line experiment: good
defaults, Flower's telemetry / update check / runtime installs switched off, FLWR_HOME and Ray's temp dir in a
temp dir that is removed afterwards, one progress line per round, and no process left running.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.identity import site_id_for_partition
from shared.log import configure_logging
from shared.site import write_site_settings

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


def run_simulation(
    overrides: Mapping[str, Any],
    *,
    num_clients: int,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    site_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Simulate ``num_clients`` sites with the run config ``overrides`` (kebab-case keys); returns the run dir."""
    offline_environment()
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **overrides})  # validate before starting anything
    if num_clients < cfg.min_train_nodes:
        raise ValueError(f"num_clients={num_clients} is below min-train-nodes={cfg.min_train_nodes}")
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise RuntimeError(f"{PROJECT_ROOT} has no pyproject.toml: install PrivaTune editable (pip install -e .)")
    configure_logging(verbose=verbose)

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

    scratch = Path(tempfile.mkdtemp(prefix="privatune-"))
    os.environ["FLWR_HOME"] = str(scratch / "flwr")
    # The same Run set-up flwr.simulation.run_simulation does, plus our run config (flwr 1.41 internals).
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(cfg.to_flower())
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    if site_settings:  # each simulated site's own settings (its budget), which the server never sees
        for i in range(num_clients):
            write_site_settings(cfg.simulation_dir(run_id) / "sites" / site_id_for_partition(i), site_settings)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    cpus = os.cpu_count() or 1
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
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
        shutil.rmtree(scratch, ignore_errors=True)
    run_dir = cfg.run_dir(run_id)
    if not (run_dir / "metrics.json").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'metrics.json'}; see the log above")
    return run_dir


def summary(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["rounds"][-1] if metrics["rounds"] else None
    lines = [f"run {metrics['run_id']} -> {run_dir}"]
    if last:
        t = last["test"]
        lines.append(
            f"final test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  "
            f"precision {t['precision']:.4f}  recall {t['recall']:.4f}  loss {t['loss']:.4f}"
        )
    eps: dict[str, Any] = {}
    for r in metrics["rounds"]:
        for site, m in r["clients"].items():
            eps[site] = m["epsilon"]
    if eps:
        shown = ", ".join(f"{s}={'inf' if v is None else f'{v:.3f}'}" for s, v in sorted(eps.items()))
        lines.append(f"cumulative epsilon per site (delta {metrics['config']['delta']:g}): {shown}")
    lines.append(f"adapter: {metrics.get('adapter_dir')}")
    return "\n".join(lines)
