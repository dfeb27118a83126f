"""How long a run will take on this machine, measured before it starts: the data's token lengths and this
machine's speed at a DP step, scaled to the run's plan.

A site's round costs a model load, the encoding of its rows and ``local-steps`` DP steps on Poisson batches of
about ``batch-size`` rows; a classifier's centered run adds round 0, one forward pass over every row. A step's
cost grows with the tokens it computes on: its batch is sorted by length and cut into micro-batches, each as wide
as its longest row (:func:`shared.batching.micro_batches`), so :func:`padded_tokens` counts what the step pays
for. The preflight times one real DP step (Opacus, the task's loss) and one evaluation on a few sampled rows, on
one thread as a simulated site's Ray worker runs, and scales them by the padded tokens of the run's own batches
(long texts cost more: a batch of 300-token reviews computes ten times the tokens of one of tweets), the sites
that train at once, the rounds, and the server's held-out rows. It is an estimate: a machine busy with other
work, or a first load from a cold disk, runs slower.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.batching import row_lengths, select

if TYPE_CHECKING:
    from shared.config import RunConfig
    from shared.tasks.base import Rows, Task

STARTUP_SECONDS = 25.0  # Flower and Ray starting, the workers importing torch (measured: 20-30 s on 2 cores)
SAMPLE_ROWS = 16  # rows of the timed DP step and evaluation


def padded_tokens(lengths: np.ndarray, micro_batch_size: int) -> int:
    """The tokens a step computes on: the batch sorted by length, cut into near-equal micro-batches of at most
    ``micro_batch_size`` rows (0: one), each as wide as its longest row."""
    if lengths.size == 0:
        return 0
    ordered = np.sort(lengths)[::-1]
    pieces = math.ceil(ordered.size / micro_batch_size) if micro_batch_size else 1
    return int(sum(len(p) * int(p.max()) for p in np.array_split(ordered, pieces)))


def expected_step_tokens(
    lengths: np.ndarray, *, rows: int, batch_size: int, micro_batch_size: int, seed: int = 0
) -> float:
    """The mean padded tokens of a Poisson batch at rate ``min(1, batch_size / rows)`` from a site of ``rows`` rows
    whose lengths are drawn from ``lengths`` (a sample of the run's rows; a few seeded draws)."""
    rng = np.random.default_rng(seed)
    rate = min(1.0, batch_size / max(rows, 1))
    draws = [padded_tokens(rng.choice(lengths, rng.binomial(rows, rate)), micro_batch_size) for _ in range(8)]
    return float(np.mean(draws))


@dataclass(frozen=True)
class MachineSpeed:
    """What this machine takes, on one thread: seconds per padded token of a DP step and of a forward pass, per
    row of the server's evaluation, to build the model, and to encode a row."""

    train_per_token: float
    forward_per_token: float
    eval_per_row: float
    model_seconds: float
    encode_per_row: float


@dataclass(frozen=True)
class RunPlan:
    """The run's shape: rows per site, their token lengths, and the run config's schedule."""

    site_rows: list[int]
    lengths: np.ndarray  # token lengths (after max-length) of the training rows, or of a random sample of them
    test_rows: int
    rounds: int
    local_steps: int
    batch_size: int
    micro_batch_size: int
    centering: bool  # round 0: one forward pass over every row at every site
    parallel_sites: int  # sites that train at once (Ray workers that fit the CPUs)


@dataclass(frozen=True)
class RunTimeEstimate:
    round0_seconds: float
    training_seconds: float  # a round's part at the sites: what the server waits for in the training stage
    round_seconds: float
    total_seconds: float
    mean_tokens: float
    step_tokens: float

    def describe(self) -> str:
        first = f"round 0 about {_duration(self.round0_seconds)}, " if self.round0_seconds else ""
        return (
            f"estimated time on this machine: about {_duration(self.total_seconds)} "
            f"({first}about {_duration(self.round_seconds)} a round; rows of {self.mean_tokens:.0f} tokens on "
            f"average, a DP step computes on about {self.step_tokens:,.0f} padded tokens)"
        )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def estimate(plan: RunPlan, speed: MachineSpeed) -> RunTimeEstimate:
    """The run's seconds from the plan and the machine's speed: the sites train in waves of ``parallel_sites``
    (each wave as slow as its largest site), then the server evaluates its held-out rows."""
    step_tokens = max(
        expected_step_tokens(
            plan.lengths, rows=rows, batch_size=plan.batch_size, micro_batch_size=plan.micro_batch_size
        )
        for rows in set(plan.site_rows)
    )
    largest = max(plan.site_rows)
    waves = math.ceil(len(plan.site_rows) / max(plan.parallel_sites, 1))
    setup = speed.model_seconds + speed.encode_per_row * largest
    site_round = setup + plan.local_steps * step_tokens * speed.train_per_token
    evaluation = speed.eval_per_row * plan.test_rows
    round_seconds = waves * site_round + evaluation
    round0 = 0.0  # the centering query: each site's forward pass over all its rows
    if plan.centering:
        per_row = padded_tokens(plan.lengths, 32) / plan.lengths.size
        round0 = waves * (setup + largest * per_row * speed.forward_per_token)
    # the server evaluates the untrained model once, then the model of every round
    total = STARTUP_SECONDS + round0 + evaluation + plan.rounds * round_seconds
    return RunTimeEstimate(
        round0_seconds=round0,
        training_seconds=max(waves * site_round, round0),
        round_seconds=round_seconds,
        total_seconds=total,
        mean_tokens=float(plan.lengths.mean()) if plan.lengths.size else 0.0,
        step_tokens=step_tokens,
    )


def _clock(device: str) -> Callable[[], float]:
    """Seconds of this process's CPU time; on a GPU, wall time once its queued work is done."""
    if torch.device(device).type != "cuda":
        return time.process_time

    def gpu_clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return gpu_clock


def measure_speed(
    cfg: RunConfig, task: Task, train_rows: Rows, test_rows: Rows, *, device: str = "cpu", seed: int = 0
) -> MachineSpeed:
    """Time the run's real pieces on a few sampled rows, on one thread: building the model, encoding, one DP step
    (Opacus, the task's loss, the run's micro-batches; noise 1, learning rate 0, on a throw-away model: nothing
    is released) and the task's evaluation. CPU time, not wall time: the estimate is for this machine when the
    run has it to itself, whatever else runs while it is measured."""
    from client.train import train_round

    rng = np.random.default_rng(seed)
    clock = _clock(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task.fresh_model(cfg, train_rows)  # the first load pays for imports; a site's worker pays for them once
        start = clock()
        model = task.fresh_model(cfg, train_rows)
        model_seconds = clock() - start

        drawn = rng.choice(len(train_rows), min(SAMPLE_ROWS, len(train_rows)), replace=False)
        sample = train_rows.subset(np.sort(drawn))
        start = clock()
        data = task.encode(cfg, sample)
        encode_per_row = (clock() - start) / len(sample)
        lengths = row_lengths(data.attention_mask).numpy()

        def step(rows: int) -> float:
            part = select(data, torch.arange(rows))
            begin = clock()
            train_round(
                model,
                part,
                steps=1,
                batch_size=len(part),
                learning_rate=0.0,
                optimizer_name="sgd",
                dp=True,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                seed=None,  # the OS's CSPRNG, as a run's step draws it
                device=device,
                micro_batch_size=cfg.micro_batch_size,
                autocast=cfg.autocast,
                loss_fn=task.loss,
            )
            return clock() - begin

        step(min(2, len(data)))  # the first step pays for Opacus's and torch's one-off set-up
        # a Poisson batch at rate 1 holds every row: the step computed on the whole sample
        train_per_token = step(len(data)) / max(padded_tokens(lengths, cfg.micro_batch_size), 1)

        model.eval()
        with torch.no_grad():
            model(input_ids=data.input_ids[:2], attention_mask=data.attention_mask[:2])  # one-off set-up
            begin = clock()
            for i in range(0, len(data), 32):
                piece = select(data, torch.arange(i, min(i + 32, len(data))))
                model(input_ids=piece.input_ids, attention_mask=piece.attention_mask)
            forward_per_token = (clock() - begin) / max(padded_tokens(lengths, 32), 1)

        evaluated = test_rows.subset(np.arange(min(SAMPLE_ROWS, len(test_rows))))
        evaluate = task.evaluator(cfg, evaluated, device=device)
        begin = clock()
        evaluate(model)
        eval_per_row = (clock() - begin) / max(len(evaluated), 1)
    finally:
        torch.set_num_threads(threads)
    return MachineSpeed(
        train_per_token=train_per_token,
        forward_per_token=forward_per_token,
        eval_per_row=eval_per_row,
        model_seconds=model_seconds,
        encode_per_row=encode_per_row,
    )
