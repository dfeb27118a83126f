"""Federated SFT of a causal LM (default: SmolLM2-135M-Instruct, offline) under DP, against non-private and the
untuned base, through the real stack: Flower's simulation runtime, Opacus DP-SGD at every site, secure
aggregation, the site ledgers.

Each setting is one ``privatune simulate --task causal-lm`` run; the untuned base is the run's round 0 evaluation
(the held-out test set before any training). Prints a markdown table: held-out loss, perplexity and exact-match
accuracy of greedy generation (the response is a label), the largest site epsilon, and wall seconds per round.

    python simulations/benchmark_causal_lm.py                          # 3 sites x 3 rounds: the docs table
    python simulations/benchmark_causal_lm.py --sites 5 --rounds 2 --set max-test-examples=100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.cli import parse_overrides  # noqa: E402
from shared.simulation import run_simulation  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "DP (epsilon 8)": {"dp": True, "target-epsilon": 8.0},
    "non-private": {"dp": False},
}


def _row(name: str, test: dict[str, Any], *, epsilon: str, seconds: str) -> str:
    exact = test.get("exact_match")
    return (
        f"| {name} | {test['loss']:.4f} | {test.get('perplexity', float('nan')):.2f} | "
        f"{'-' if exact is None else f'{exact:.4f}'} | {epsilon} | {seconds} |"
    )


def _max_epsilon(metrics: dict[str, Any]) -> str:
    values = [c["epsilon"] for r in metrics["rounds"] for c in r["clients"].values()]
    if not values or any(v is None for v in values):
        return "inf"
    return f"{max(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--only", action="append", default=[], help="run only these settings (by name)")
    args = parser.parse_args(argv)
    common = {"task": "causal-lm", "num-server-rounds": args.rounds, **parse_overrides(args.set)}
    lines = [
        f"federated SFT, {args.sites} sites x {args.rounds} rounds, task causal-lm, {common}",
        "",
        "| setting | test loss | perplexity | exact match | max site epsilon | seconds / round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="privatune-sft-") as tmp:
        for name, setting in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            started = time.monotonic()
            run_dir = run_simulation(
                {**common, **setting, "output-dir": str(Path(tmp) / name.split()[0])}, num_clients=args.sites
            )
            metrics = json.loads((run_dir / "metrics.json").read_text())
            base = base or metrics["initial_test"]
            seconds = statistics.mean(r["seconds"] for r in metrics["rounds"])
            final = metrics["rounds"][-1]["test"]
            lines.append(_row(name, final, epsilon=_max_epsilon(metrics), seconds=f"{seconds:.1f}"))
            print(f"{name}: {time.monotonic() - started:.0f}s wall, final {final}", flush=True)
    if base is not None:
        lines.insert(4, _row("untuned base", base, epsilon="0", seconds="-"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
