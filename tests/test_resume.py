"""Server checkpoints: atomic, complete, checked on resume; a crash mid-write keeps the previous checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from shared.config import RunConfig


def _ckpt(server_round: int = 2, **changes) -> Checkpoint:
    rng = np.random.default_rng(5)
    rng.random(3)
    fields = {
        "run_id": "101",
        "lineage": [],
        "server_round": server_round,
        "config": RunConfig(num_server_rounds=4).to_flower(),
        "rng_state": rng.bit_generator.state,
        "history": {"rounds": [{"round": r} for r in range(1, server_round + 1)]},
        "run_ledger_head": "ab" * 32,
        "arrays": {
            "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3) * server_round,
            "a": np.ones(2, np.float32),
        },
    }
    return Checkpoint(**{**fields, **changes})


def test_checkpoint_round_trips_arrays_rng_and_history(tmp_path):
    saved = _ckpt()

    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)

    assert loaded.server_round == 2 and loaded.run_id == "101" and loaded.history == saved.history
    assert list(loaded.arrays) == list(saved.arrays)
    assert all(np.array_equal(loaded.arrays[k], saved.arrays[k]) for k in saved.arrays)
    assert loaded.rng().random() == saved.rng().random()
    assert loaded.run_ledger_head == "ab" * 32


def test_a_newer_checkpoint_replaces_the_older_and_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))

    assert {p.name for p in tmp_path.iterdir()} == {CHECKPOINT_FILE, "checkpoint-r2.npz"}
    assert load_checkpoint(tmp_path).server_round == 2


def test_crash_after_the_arrays_before_the_json_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    (tmp_path / "checkpoint-r2.npz").write_bytes(b"half-written")  # the next round's arrays, then kill -9
    (tmp_path / (CHECKPOINT_FILE + ".tmp")).write_text('{"version": 1, "rou')

    loaded = load_checkpoint(tmp_path)

    assert loaded.server_round == 1
    assert np.array_equal(loaded.arrays["b.weight"], _ckpt(1).arrays["b.weight"])


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint to resume from: {tmp_path}/checkpoint.json"):
        load_checkpoint(tmp_path)


def test_checkpoint_that_is_not_json_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_text("{")

    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_checkpoint(tmp_path)


def test_tampered_checkpoint_arrays_are_refused(tmp_path):
    save_checkpoint(tmp_path, _ckpt())
    path = tmp_path / "checkpoint-r2.npz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))

    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_its_arrays_is_refused(tmp_path):
    save_checkpoint(tmp_path, _ckpt())
    (tmp_path / "checkpoint-r2.npz").unlink()

    with pytest.raises(CheckpointError, match="names .*checkpoint-r2.npz, which does not exist"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_another_version_is_refused(tmp_path):
    save_checkpoint(tmp_path, _ckpt())
    meta = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    (tmp_path / CHECKPOINT_FILE).write_text(json.dumps({**meta, "version": 9}))

    with pytest.raises(CheckpointError, match="has version 9, expected 1"):
        load_checkpoint(tmp_path)


def test_resume_with_the_same_config_but_resume_and_output_dir_is_allowed():
    ckpt = _ckpt()
    config = {**ckpt.config, "resume": "/runs/run-101", "output-dir": "/elsewhere"}

    check_resumable(ckpt, config, dict(ckpt.arrays))


def test_resume_with_another_config_is_refused_naming_the_key():
    ckpt = _ckpt()

    with pytest.raises(CheckpointError, match=f"learning-rate: {ckpt.config['learning-rate']!r} -> 0.123"):
        check_resumable(ckpt, {**ckpt.config, "learning-rate": 0.123}, dict(ckpt.arrays))


def test_resume_with_other_tensors_is_refused():
    ckpt = _ckpt()

    with pytest.raises(CheckpointError, match="other tensors"):
        check_resumable(ckpt, ckpt.config, {"a": np.ones(3, np.float32), "b.weight": np.ones((2, 3), np.float32)})


def test_run_killed_after_its_last_checkpoint_is_resumable_to_save_its_adapter():
    ckpt = _ckpt(4)

    check_resumable(ckpt, ckpt.config, dict(ckpt.arrays))


def test_server_optimizer_state_round_trips_exactly(tmp_path):
    from server.optimizer import ServerOptimizer

    opt = ServerOptimizer(kind="fedadam", learning_rate=0.1)
    for seed in range(3):
        opt.step(np.random.default_rng(seed).normal(size=5))
    save_checkpoint(tmp_path, _ckpt(strategy_state=opt.state_dict()))

    restored = ServerOptimizer.from_state_dict(load_checkpoint(tmp_path).strategy_state)

    update = np.random.default_rng(9).normal(size=5)
    assert np.array_equal(restored.step(update), opt.step(update))
