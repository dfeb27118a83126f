"""Local against distributed DP noise (issue 13): accuracy and macro-F1 at epsilon 1, 3 and 8, and non-private.

Every row is the real stack (Flower's simulation runtime, Opacus at every site, secure aggregation, the site
ledgers) on the default task with ``--num-clients`` IID sites:

- non-private: ``dp = false``;
- local noise at epsilon e: each site calibrates its own noise to e (today's default, ``local-steps`` steps
  per round);
- distributed noise at epsilon e: one SGD step per round (the only mechanism analysed,
  docs/distributed-dp.md), the aggregate noise multiplier calibrated here to e at the largest sample rate of the
  sites (the smallest site), with the centering query as prior event, under the aggregate guarantee. Each site
  adds its 1/M share; its ledger records both guarantees (the ``fallback`` column is the largest epsilon a site
  enforced: its own share alone). By default distributed runs take ``rounds x local-steps`` rounds, so both
  modes take the same number of DP-SGD steps.

    python simulations/benchmark_distributed_dp.py                      # the table in docs/benchmarks.md
    python simulations/benchmark_distributed_dp.py --num-clients 3 --rounds 2 --epsilon 8 --only distributed
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.app import poisson_sample_rate  # noqa: E402
from shared.centering import query_event  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.distributed_dp import calibrate_aggregate_noise  # noqa: E402
from shared.federation import load_run_dataset, simulated_split  # noqa: E402
from shared.simulation import run_simulation  # noqa: E402


def aggregate_noise_multiplier(cfg: RunConfig, *, num_clients: int, epsilon: float) -> float:
    """The aggregate noise multiplier whose ``num-server-rounds`` distributed rounds, after the centering query,
    spend ``epsilon`` at every site (calibrated at the largest site sample rate)."""
    parts, _ = simulated_split(cfg, load_run_dataset(cfg), num_clients)
    rate = max(poisson_sample_rate(len(p), cfg.batch_size) for p in parts)
    prior = (query_event(clip_norm=cfg.center_clip_norm, noise_multiplier=cfg.center_noise_multiplier),)
    return calibrate_aggregate_noise(
        target_epsilon=epsilon,
        delta=cfg.delta,
        sample_rate=rate,
        rounds=cfg.num_server_rounds,
        prior=prior if cfg.center_features else (),
    )


def federated(overrides: dict[str, Any], num_clients: int, out: Path) -> dict[str, Any]:
    run_dir = run_simulation({**overrides, "output-dir": str(out)}, num_clients=num_clients)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["rounds"][-1]
    eps = [c["epsilon"] for c in final["clients"].values() if c.get("epsilon") is not None]
    return {
        **final["test"],
        "enforced_epsilon": max(eps, default=float("inf")),
        "dp_noise": final.get("dp_noise"),
        "aborted_rounds": sum(r["aborted"] for r in metrics["rounds"]),
    }


def settings(args: argparse.Namespace, base: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    rounds = args.rounds or base.num_server_rounds
    distributed_rounds = args.distributed_rounds or rounds * base.local_steps
    non_private = {"dp": False, "num-server-rounds": rounds, "learning-rate": args.nonprivate_lr}
    out: list[tuple[str, dict[str, Any]]] = [("non-private", non_private)]
    for eps in args.epsilon:
        out.append((f"local, eps={eps:g}", {"target-epsilon": eps, "num-server-rounds": rounds}))
        distributed = {
            "dp-noise": "distributed",
            "target-epsilon": 0.0,
            "local-steps": 1,
            "optimizer": "sgd",
            "num-server-rounds": distributed_rounds,
            # a site's update is -(lr / B) x its clipped gradient sum: at most lr x C when the batch is at its
            # expected size and every gradient points the same way; clipping it is a projection (no cost in
            # privacy), 1.5 x leaves room for larger Poisson batches
            "update-clip-norm": 1.5 * base.learning_rate * base.max_grad_norm,
        }
        cfg = RunConfig.from_flower({**base.to_flower(), **distributed, "noise-multiplier": 1.0})
        z = aggregate_noise_multiplier(cfg, num_clients=args.num_clients, epsilon=eps)
        out.append((f"distributed, eps={eps:g}", {**distributed, "noise-multiplier": z}))
    if args.only:
        out = [s for s in out if any(o in s[0] for o in args.only)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the local and non-private runs")
    parser.add_argument(
        "--distributed-rounds", type=int, default=None, help="rounds of the distributed runs (rounds x local-steps)"
    )
    parser.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="local-steps of the local and non-private runs (default: the run config's)",
    )
    parser.add_argument(
        "--nonprivate-lr",
        type=float,
        default=3.0,
        help="client learning rate of the non-private run (the DP default of 10 diverges without noise and clipping)",
    )
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--no-center",
        action="store_true",
        help="center-features = false in every run: the centering query alone spends about 0.73 (PRV) / 0.79 "
        "(RDP) of epsilon at delta 1e-5, most of an epsilon-1 budget",
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only settings whose name contains these")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--set", action="append", default=[], help="a run-config override of every run, KEY=TOML-VALUE (data-path=...)"
    )
    args = parser.parse_args(argv)
    extra_config = {k: v for item in args.set for k, v in tomllib.loads(item).items()}

    base = RunConfig.from_flower(
        {
            **RunConfig().to_flower(),
            **extra_config,
            "delta": args.delta,
            **({"center-features": False} if args.no_center else {}),
            **({} if args.local_steps is None else {"local-steps": args.local_steps}),
        }
    )
    rows = []
    header = f"{'setting':<22} {'rounds':>6} {'noise':>7} {'accuracy':>9} {'macro-F1':>9} {'fallback eps':>12} {'s':>6}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="privatune-ddp-") as tmp:
        for name, extra in settings(args, base):
            overrides = {
                **extra_config,
                "delta": args.delta,
                "center-features": base.center_features,
                "local-steps": base.local_steps,
                **extra,
            }
            started = time.monotonic()
            result = federated(overrides, args.num_clients, Path(tmp) / str(len(rows)))
            seconds = time.monotonic() - started
            noise = extra.get("noise-multiplier")
            rows.append({"setting": name, **overrides, **result, "seconds": seconds})
            fallback = "-" if "distributed" not in name else f"{result['enforced_epsilon']:.2f}"
            print(
                f"{name:<22} {extra['num-server-rounds']:>6} {'-' if noise is None else f'{noise:.3f}':>7} "
                f"{result['accuracy']:>9.4f} {result['macro_f1']:>9.4f} {fallback:>12} {seconds:>6.0f}",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
