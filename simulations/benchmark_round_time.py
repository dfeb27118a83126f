"""Wall time of a simulation round with secure aggregation against the same round with plain aggregation.

Runs the default simulation (the real stack: Flower's runtime, Opacus, the site ledgers) twice with the same
settings, once per aggregation, alternating so that machine load hits both alike, and prints the mean and
median round seconds (round 1 excluded: it pays the workers' start-up and the noise calibration).

    python simulations/benchmark_round_time.py --rounds 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.simulation import run_simulation  # noqa: E402


def round_seconds(run_dir: Path) -> list[float]:
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    return [r["seconds"] for r in rounds[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="privatune-rounds-") as tmp:
        for i in range(args.repeats):
            for secure in (True, False):
                overrides = {
                    "num-server-rounds": args.rounds,
                    "secure-aggregation": secure,
                    "output-dir": str(Path(tmp) / f"{i}-{secure}"),
                }
                times[secure] += round_seconds(run_simulation(overrides, num_clients=args.num_clients))
    print(f"{'aggregation':<12} {'rounds':>6} {'mean s':>8} {'median s':>9}")
    for secure in (False, True):
        t = times[secure]
        print(
            f"{'secure' if secure else 'plain':<12} {len(t):>6} {statistics.mean(t):>8.2f} {statistics.median(t):>9.2f}"
        )
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"secure / plain (median round): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
