"""Accuracy of private federated LoRA against its non-private and centralized baselines.

Prints one row per setting: final test accuracy and macro-F1 on the held-out split.

- centralized, non-private LoRA: one party trains on the union of all sites' rows, as many examples as the
  federation processes in total;
- federated non-private: FFA-LoRA and plain LoRA;
- federated DP at (epsilon, delta) = (8, 1e-5): FFA-LoRA and plain LoRA;
for IID and Dirichlet(alpha) label-skewed partitions of 10 sites. Every federated run is the real stack:
Flower's simulation runtime, Opacus DP-SGD at every site, secure aggregation, the site ledgers.

    python simulations/benchmark_accuracy.py                # the table in docs/benchmarks.md
    python simulations/benchmark_accuracy.py --rounds 2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.train import noisy_feature_sum, train_round  # noqa: E402
from shared.centering import center_from_sum  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.federation import load_run_dataset, server_test_set, simulated_split  # noqa: E402
from shared.metrics import evaluate_model  # noqa: E402
from shared.model import build_model, encode, load_tokenizer, set_feature_center  # noqa: E402
from shared.simulation import run_simulation  # noqa: E402


def centralized(cfg: RunConfig, num_clients: int) -> dict[str, float]:
    """Non-private LoRA on all training rows at one party, for the federation's total number of steps."""
    data = load_run_dataset(cfg)
    parts, _ = simulated_split(cfg, data, num_clients)
    rows = data.subset(np.concatenate(parts))
    tokenizer = load_tokenizer(cfg.model_path)
    train = encode(tokenizer, rows.texts, rows.labels, max_length=cfg.max_length)
    test = server_test_set(cfg, data, num_clients)
    model = build_model(cfg, len(data.label_names))
    if cfg.center_features:  # one party, non-private: the exact mean of the clipped pooled vectors
        answer = noisy_feature_sum(model, train, clip_norm=cfg.center_clip_norm, noise_multiplier=0.0, seed=0)
        center, _ = center_from_sum(answer, clip_norm=cfg.center_clip_norm)
        assert center is not None  # no noise: the count is the row count
        set_feature_center(model, center)
    # the federation sees rounds x clients x local steps x batch examples; so does the central run, in
    # batches of the sites' size (one batch of all sites' rows at once would not fit in memory)
    steps = cfg.num_server_rounds * cfg.local_steps * num_clients
    train_round(
        model,
        train,
        steps=steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        optimizer_name=cfg.optimizer,
        dp=False,
        noise_multiplier=0.0,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
    )
    enc = encode(tokenizer, test.texts, test.labels, max_length=cfg.max_length)
    return evaluate_model(model, enc, num_classes=len(data.label_names))


def federated(overrides: dict, num_clients: int, out: Path) -> dict[str, float]:
    run_dir = run_simulation({**overrides, "output-dir": str(out)}, num_clients=num_clients)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["rounds"][-1]
    eps = [c["epsilon"] for c in final["clients"].values()]
    return {**final["test"], "max_epsilon": max((e for e in eps if e is not None), default=float("inf"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="override num-server-rounds")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--nonprivate-lr",
        type=float,
        default=3.0,
        help="client learning rate of the federated non-private rows (the centralized row takes --central-lr): "
        "without per-sample clipping their gradients are several times larger than the clipped DP ones; the DP "
        "default (10) overshoots, 1 under-trains in 8 rounds (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--central-lr", type=float, default=1.0, help="client learning rate of the centralized row (80 steps)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only settings whose name contains these")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    base = RunConfig() if args.rounds is None else replace(RunConfig(), num_server_rounds=args.rounds)
    common = {"num-server-rounds": base.num_server_rounds, "delta": args.delta}
    settings: list[tuple[str, str, dict]] = [
        ("centralized, non-private", "iid", {"lora-mode": "ffa", "learning-rate": args.central_lr})
    ]
    for split in ("iid", "dirichlet"):
        for mode in ("ffa", "lora"):
            nonprivate = {"lora-mode": mode, "dp": False, "learning-rate": args.nonprivate_lr}
            settings.append((f"federated, non-private, {mode}", split, nonprivate))
            settings.append(
                (
                    f"federated, DP eps={args.epsilon:g}, {mode}",
                    split,
                    {"lora-mode": mode, "target-epsilon": args.epsilon},
                )
            )
    if args.only:
        settings = [s for s in settings if any(o in f"{s[0]} {s[1]}" for o in args.only)]

    rows = []
    print(f"{'setting':<34} {'split':<16} {'accuracy':>9} {'macro-F1':>9} {'epsilon':>8} {'seconds':>8}", flush=True)
    with tempfile.TemporaryDirectory(prefix="privatune-bench-") as tmp:
        for name, split, extra in settings:
            overrides = {**common, **extra, "partitioning": split, "dirichlet-alpha": args.alpha}
            started = time.monotonic()
            if name.startswith("centralized"):
                cfg = RunConfig.from_flower({**base.to_flower(), **overrides})
                result = {**centralized(cfg, args.num_clients), "max_epsilon": float("inf")}
            else:
                result = federated(overrides, args.num_clients, Path(tmp) / f"{len(rows)}")
            seconds = time.monotonic() - started
            split_name = split if split == "iid" else f"dirichlet({args.alpha:g})"
            eps = "-" if result["max_epsilon"] == float("inf") else f"{result['max_epsilon']:.2f}"
            rows.append({"setting": name, "split": split_name, **result, "seconds": seconds})
            print(
                f"{name:<34} {split_name:<16} {result['accuracy']:>9.4f} {result['macro_f1']:>9.4f} {eps:>8} "
                f"{seconds:>8.0f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
