"""Canary mode with white-box gradient canaries (``canary-kind = "gradient"``, simulations only).

A gradient canary is a record made up in gradient space, as in the white-box audits of DP-SGD (Nasr et al.
2021 and 2023, Steinke, Nasr and Jagielski 2023): in every DP-SGD step each of a site's inserted canaries is
drawn into the batch with the step's Poisson rate, like a row, and its per-example gradient is the clip norm on
one audit coordinate of its own and zero everywhere else. The audit coordinates are parameters of the site's DP
optimizer alone (``client/canary_rows.py``): it clips, sums, noises and steps them with the model's trainable
weights, and the model's rows have zero gradient on them. Without noise a canary's coordinate moves exactly
when the canary was drawn and stays at 0 otherwise, so the guesses are as good as a run allows; with the
recorded noise they are as hard as DP-SGD says. A canary costs one number, so thousands are cheap, and the
one-run audit needs thousands (:mod:`shared.audit.fdp`).

The flow: every party derives the same canaries from the run's seed (a site and a fair coin per canary); a site
inserts its "in" canaries into each DP step and, after each round, appends its canaries' coordinates to
``<site-dir>/canaries/run-<run id>.jsonl`` in its own directory; at the end of the simulation the server turns
those into ``canary_scores.json`` (a canary's score: how far its coordinate moved against its gradient, over
all rounds) for ``privatune audit``. Nothing is sent: a simulation's sites and server share one disk, which is
why canary mode is for simulations only.

What it tests: everything from the per-example gradients on (clipping, the noise and its scale, the sample rate
and steps the ledger records). What it does not: how the rows are read and their per-example gradients computed
(Opacus's hooks); text canaries (``canary-kind = "text"``, :mod:`shared.canary_data`) go through those, with a
black-box score and much less power. The canaries are not rows of the site's data: its fingerprint, row count
and sample rate are unchanged, and their coordinates are part of the noisy steps its ledger accounts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.audit.canary import CanaryError
from shared.canary_data import CANARY_FILE
from shared.identity import site_id_for_partition
from shared.site import Site

CANARY_DIR = "canaries"  # under a simulated site's directory
SCORE = "minus the change of the canary's audit coordinate over the run's rounds at its site"


@dataclass(frozen=True)
class GradientCanaries:
    """The run's canaries: per canary, the partition id of its site and whether it is inserted."""

    sites: np.ndarray
    included: np.ndarray
    num_sites: int

    def at(self, partition_id: int) -> np.ndarray:
        """Indices of the canaries of the site with ``partition_id``, in canary order (its coordinates' order)."""
        return np.flatnonzero(self.sites == partition_id)

    def included_at(self, partition_id: int) -> np.ndarray:
        """Which of the site's canaries are inserted, in the order of its coordinates."""
        return self.included[self.at(partition_id)]


def make_gradient_canaries(m: int, *, num_sites: int, seed: int) -> GradientCanaries:
    """``m`` canaries from the run's seed: each at a uniformly drawn site, inserted with probability 1/2."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise CanaryError(f"canaries must be a positive integer, got {m!r}")
    if num_sites < 1:
        raise CanaryError(f"num_sites must be >= 1, got {num_sites}")
    rng = np.random.default_rng([seed, 0x6CA7A])
    sites = rng.integers(num_sites, size=m)
    included = rng.random(m) < 0.5
    return GradientCanaries(sites=sites, included=included, num_sites=num_sites)


def site_canaries(canaries: int, *, seed: int, site: Site) -> np.ndarray:
    """The client's one call: which of this simulated site's gradient canaries are inserted."""
    if not site.simulated or site.partition_id is None or not site.num_partitions:
        raise CanaryError(f"canary mode is for simulations only; site {site.site_id!r} is a deployed site")
    run = make_gradient_canaries(canaries, num_sites=site.num_partitions, seed=seed)
    return run.included_at(site.partition_id)


def site_canary_path(site_dir: Path, run_id: str) -> Path:
    return Path(site_dir) / CANARY_DIR / f"run-{run_id}.jsonl"


def read_site_rounds(path: Path) -> dict[int, np.ndarray]:
    """A site's recorded rounds: round -> its canaries' coordinates after that round's training."""
    rounds: dict[int, np.ndarray] = {}
    if not Path(path).exists():
        return rounds
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            server_round, values = int(record["round"]), np.asarray(record["values"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise CanaryError(f"{path} line {number}: not a canary round record: {e}") from e
        if server_round in rounds:
            raise CanaryError(f"{path} line {number}: round {server_round} is recorded twice")
        if values.ndim != 1 or not np.all(np.isfinite(values)):
            raise CanaryError(f"{path} line {number}: 'values' must be a list of finite numbers")
        rounds[server_round] = values
    return rounds


def record_site_round(site_dir: Path, *, run_id: str, server_round: int, values: np.ndarray) -> Path:
    """Append one round's coordinates of the site's canaries (once per round: a replay is refused)."""
    path = site_canary_path(site_dir, run_id)
    if server_round in read_site_rounds(path):
        raise CanaryError(f"{path}: round {server_round} of run {run_id} is already recorded")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"round": server_round, "values": [float(v) for v in values]}, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def gradient_canary_scores(
    canaries: GradientCanaries, site_rounds: Mapping[int, Mapping[int, np.ndarray]]
) -> np.ndarray:
    """Each canary's score from its site's recorded rounds (``site_rounds[partition id][round]``): minus the sum
    of its coordinate's changes (a step moves a coordinate against its gradient; a site that never trained
    leaves its canaries at 0)."""
    scores = np.zeros(len(canaries.sites), dtype=np.float64)
    for partition_id, rounds in site_rounds.items():
        mine = canaries.at(partition_id)
        for server_round, values in rounds.items():
            if values.shape != mine.shape:
                raise CanaryError(
                    f"site {site_id_for_partition(partition_id)} recorded {values.size} canary coordinates in round "
                    f"{server_round}, but has {mine.size} canaries"
                )
            scores[mine] -= values
    return scores


def write_gradient_canary_scores(
    run_dir: Path, *, run_id: str, seed: int, canaries: GradientCanaries, sim_dir: Path, delta: float | None
) -> Path:
    """Read every simulated site's canary rounds under ``sim_dir`` and write ``canary_scores.json``."""
    site_ids = [site_id_for_partition(i) for i in range(canaries.num_sites)]
    site_rounds = {
        i: read_site_rounds(site_canary_path(Path(sim_dir) / "sites" / s, run_id)) for i, s in enumerate(site_ids)
    }
    scores = gradient_canary_scores(canaries, site_rounds)
    payload: dict[str, Any] = {
        "run_id": run_id,
        "seed": seed,
        "delta": delta,
        "kind": "gradient",
        "score": SCORE,
        "canaries": [
            {"index": i, "site": site_ids[int(s)], "included": bool(inside), "score": float(score)}
            for i, (s, inside, score) in enumerate(zip(canaries.sites, canaries.included, scores, strict=True))
        ],
    }
    path = Path(run_dir) / CANARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@dataclass
class GradientCanaryScorer:
    """The server's side: at the end of the run, the sites' recorded coordinates become canary_scores.json."""

    canaries: GradientCanaries
    sim_dir: Path

    @classmethod
    def start(cls, *, canaries: int, seed: int, num_sites: int, sim_dir: Path) -> GradientCanaryScorer | None:
        if canaries == 0:
            return None
        return cls(make_gradient_canaries(canaries, num_sites=num_sites, seed=seed), Path(sim_dir))

    def finish(self, model: Any, run_dir: Path, *, run_id: str, seed: int, delta: float) -> Path:
        return write_gradient_canary_scores(
            run_dir, run_id=run_id, seed=seed, canaries=self.canaries, sim_dir=self.sim_dir, delta=delta
        )
