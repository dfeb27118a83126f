"""The preflight's time estimate: what a step computes on, how the plan scales it, and the measured run."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from client.round_time import MachineSpeed, RunPlan, estimate, measure_speed, padded_tokens
from shared.config import RunConfig
from shared.federation import server_test_set, simulated_split
from shared.simulation import preflight, timeout_for
from shared.tasks import get_task
from tests.conftest import make_rows, write_csv

SPEED = MachineSpeed(
    train_per_token=1e-3, forward_per_token=3e-4, eval_per_row=0.01, model_seconds=1.0, encode_per_row=1e-4
)


def _plan(lengths: np.ndarray, **fields) -> RunPlan:
    plan = RunPlan(
        site_rows=[500] * 4,
        lengths=lengths,
        test_rows=300,
        rounds=3,
        local_steps=4,
        batch_size=256,
        micro_batch_size=32,
        centering=False,
        parallel_sites=2,
    )
    return replace(plan, **fields)


def test_a_step_computes_on_each_micro_batch_as_wide_as_its_longest_row():
    lengths = np.array([2, 10, 3, 5])
    assert padded_tokens(lengths, 2) == 2 * 10 + 2 * 3  # [10, 5] and [3, 2]
    assert padded_tokens(lengths, 0) == 4 * 10  # one piece
    assert padded_tokens(np.array([], dtype=int), 2) == 0


def test_long_rows_and_sites_beyond_the_cpus_cost_more():
    rng = np.random.default_rng(0)
    short = rng.integers(10, 40, size=2000)
    short_run = estimate(_plan(short), SPEED)
    long_run = estimate(_plan(short * 8), SPEED)
    # training dominates: eight times the tokens per row, close to eight times the training seconds per round
    assert 6.0 < (long_run.round_seconds - 3.0) / (short_run.round_seconds - 3.0) < 8.5
    assert long_run.mean_tokens == short_run.mean_tokens * 8
    twice_the_waves = estimate(_plan(short, site_rows=[500] * 8), SPEED)  # 8 sites, 2 at a time: 4 waves, not 2
    assert twice_the_waves.round_seconds - 3.0 == 2 * (short_run.round_seconds - 3.0)
    assert estimate(_plan(short, centering=True), SPEED).round0_seconds > 0 == short_run.round0_seconds
    assert short_run.total_seconds > short_run.round_seconds * 3


def test_the_preflight_measures_this_machine_and_logs_the_runs_time(tmp_path, tiny_model_dir, caplog):
    data = write_csv(tmp_path / "rows.csv", make_rows(120))
    cfg = RunConfig(data_path=str(data), model_path=str(tiny_model_dir), labels="rotten,fresh", max_length=16)
    task = get_task(cfg)
    rows = task.load_run_rows(cfg)
    parts, _ = simulated_split(cfg, rows, 3)
    speed = measure_speed(cfg, task, rows.subset(np.concatenate(parts)), server_test_set(cfg, rows, 3))
    assert speed.train_per_token > 0 and speed.forward_per_token > 0 and speed.eval_per_row > 0
    with caplog.at_level(logging.INFO, logger="privatune"):
        preflight(cfg, num_clients=3, estimate_time=True)
    (line,) = [r.getMessage() for r in caplog.records if "estimated time" in r.getMessage()]
    assert "a round" in line and "tokens on average" in line
    assert "long texts cost more" not in caplog.text  # rows of a few tokens


def test_long_texts_are_said_to_cost_more_with_the_setting_that_learned_more_on_them(tmp_path, tiny_model_dir, caplog):
    long_rows = [
        (" ".join([text] * 12), label) for text, label in make_rows(800)
    ]  # cut at 64 tokens (the tiny model's positions)
    data = write_csv(tmp_path / "long.csv", long_rows)
    cfg = RunConfig(data_path=str(data), model_path=str(tiny_model_dir), labels="rotten,fresh", max_length=64)
    with caplog.at_level(logging.INFO, logger="privatune"):
        preflight(cfg, num_clients=3, estimate_time=True)  # 226 training rows a site
        assert "long texts cost more" in caplog.text
        assert "--set batch-size=128 --set local-steps=8" in caplog.text
        assert "100% of the rows are cut at max-length 64: --set max-length=256" in caplog.text
        caplog.clear()
        preflight(replace(cfg, local_steps=8), num_clients=3, estimate_time=True)  # the user chose already
    assert "long texts cost more" in caplog.text and "--set batch-size=128" not in caplog.text


def test_a_round_whose_training_would_outlast_the_servers_wait_gets_a_longer_one():
    cfg = RunConfig()  # secagg-timeout 120 s: the training stage waits 480 s
    slow = replace(estimate(_plan(np.full(2000, 128)), SPEED), training_seconds=1000.0)
    quick = replace(slow, training_seconds=100.0)
    assert timeout_for(cfg, slow) == 780.0  # 3 x 1000 s over 4, in whole minutes
    assert timeout_for(cfg, quick) is None
    assert timeout_for(replace(cfg, secagg_timeout=900.0), slow) is None  # the run's own is long enough
