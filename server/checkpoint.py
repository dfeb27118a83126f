"""Round-level crash-resume for the ServerApp (Flower has none): a checkpoint after every completed round.

A checkpoint is two files in the run dir, each written atomically (temp file, fsync, rename, fsync of the
directory): ``checkpoint-r<k>.npz`` (the global trainable tensors after round k) first, then
``checkpoint.json`` (round k, the run's lineage, the run config, the sampling RNG's state, the server
optimizer's state (FedAdam moments), the metrics history, the run ledger's head, the arrays file and its
SHA-256). The JSON is the commit point: a crash before its rename leaves the previous checkpoint whole, and the
previous arrays file is only removed after.

A resumed run is a new Flower run (a new run id, its own run dir and run ledger) that starts at round k+1 from
the checkpointed adapter and RNG state. The round that was in flight when the server died is run again under
the new run id: secure aggregation is re-keyed (keys are bound to run id and round), and a site that trained
in the lost round keeps that entry in its ledger (it spent the budget) and records the new round as a new
entry, so no training is counted twice or missed.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.hashchain import write_atomic

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_VERSION = 1
# Run-config keys that may differ between the interrupted run and its resumption
RESUMABLE_CHANGES = frozenset({"resume", "output-dir", "metrics-port"})  # metrics-port: monitoring only


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not belong to the run being resumed."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after a completed round."""

    run_id: str
    lineage: list[str]  # run ids of the interrupted runs this one continues, oldest first
    server_round: int
    config: dict[str, Any]
    rng_state: dict[str, Any]
    history: dict[str, Any]
    run_ledger_head: str | None
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any] = field(default_factory=dict)  # the server optimizer's state_dict()

    def rng(self) -> np.random.Generator:
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        return rng


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(a) for name, a in arrays.items()})  # type: ignore[arg-type]  # numpy stubs
    return buf.getvalue()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``run_dir`` atomically; returns the path of ``checkpoint.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = _npz_bytes(ckpt.arrays)
    arrays_name = f"checkpoint-r{ckpt.server_round}.npz"
    write_atomic(run_dir / arrays_name, blob)
    meta = {
        "version": CHECKPOINT_VERSION,
        "run_id": ckpt.run_id,
        "lineage": ckpt.lineage,
        "round": ckpt.server_round,
        "config": ckpt.config,
        "rng_state": ckpt.rng_state,
        "run_ledger_head": ckpt.run_ledger_head,
        "arrays_file": arrays_name,
        "arrays_sha256": hashlib.sha256(blob).hexdigest(),
        "array_names": list(ckpt.arrays),
        "strategy_state": ckpt.strategy_state,
        "history": ckpt.history,
    }
    path = run_dir / CHECKPOINT_FILE
    write_atomic(path, json.dumps(meta, indent=1, allow_nan=False).encode())
    for old in run_dir.glob("checkpoint-r*.npz"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and check the checkpoint in ``run_dir``, naming the file and the problem on any error."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CHECKPOINT_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
    missing = {"run_id", "lineage", "round", "config", "rng_state", "arrays_file", "arrays_sha256", "history"} - set(
        meta
    )
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    arrays_path = run_dir / str(meta["arrays_file"])
    try:
        blob = arrays_path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} names {arrays_path}, which does not exist") from e
    if hashlib.sha256(blob).hexdigest() != meta["arrays_sha256"]:
        raise CheckpointError(f"checkpoint arrays {arrays_path} do not match the SHA-256 in {path}")
    with np.load(io.BytesIO(blob)) as npz:
        arrays = {name: npz[name] for name in meta.get("array_names", list(npz.files))}
    return Checkpoint(
        run_id=str(meta["run_id"]),
        lineage=[str(r) for r in meta["lineage"]],
        server_round=int(meta["round"]),
        config=dict(meta["config"]),
        rng_state=dict(meta["rng_state"]),
        history=dict(meta["history"]),
        run_ledger_head=meta.get("run_ledger_head"),
        arrays=arrays,
        strategy_state=dict(meta.get("strategy_state") or {}),
    )


def check_resumable(ckpt: Checkpoint, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The resumed run must be the same run: same config (but ``resume``/``output-dir``), same tensors."""
    changed = sorted(
        k for k in set(ckpt.config) | set(config) if k not in RESUMABLE_CHANGES and ckpt.config.get(k) != config.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {ckpt.config.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume run {ckpt.run_id}: the run config differs from the checkpoint's ({diffs})"
        )
    if list(ckpt.arrays) != list(arrays) or any(ckpt.arrays[k].shape != arrays[k].shape for k in arrays):
        raise CheckpointError(f"cannot resume run {ckpt.run_id}: the checkpointed adapter has other tensors")
    # round == num-server-rounds is resumable: killed after its last checkpoint, the run only saves its adapter
