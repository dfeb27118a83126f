"""How much a data set's labels can be read off the frozen encoder at all: a centralized, non-private linear probe.

For each data set and max length, the builtin encoder's mean-pooled vectors (the classifier's head input, the
adapter at zero) of up to ``--max-rows`` rows drawn at random, then an L2-regularised logistic regression fitted
to convergence (L-BFGS) on the centered vectors, scored by 5-fold cross-validation, next to the majority class.
No privacy, no federation, every row in one place: the ceiling a private federated head on these features can
approach, not a result the product gives. A data set whose probe is barely above its majority class (the drug
reviews in docs/benchmarks.md) is one the default model cannot learn, privately or not.

    python simulations/linear_probe.py --data drugs.csv:negative,positive --max-length 48,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import RunConfig  # noqa: E402
from shared.data import load_labelled_text  # noqa: E402
from shared.model import build_model, encode, load_tokenizer, pooled_features  # noqa: E402
from simulations.benchmark_user_data import data_spec  # noqa: E402


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-regularised logistic regression fitted to convergence (L-BFGS)."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, *, l2: float, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of :func:`fit_logistic` over ``folds`` folds (centered on the training folds'
    mean)."""
    n, classes = len(y), int(y.max()) + 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scores = []
    for f in range(folds):
        test = order[f * n // folds : (f + 1) * n // folds]
        train = torch.cat([order[: f * n // folds], order[(f + 1) * n // folds :]])
        mean = x[train].mean(0)
        w, b = fit_logistic(x[train] - mean, y[train], classes=classes, l2=l2)
        scores.append(float((((x[test] - mean) @ w + b).argmax(1) == y[test]).float().mean()))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="PATH[:LABELS], repeatable")
    parser.add_argument("--max-length", default="48,128", help="token limits, comma-separated")
    parser.add_argument("--max-rows", type=int, default=3400)
    parser.add_argument("--model-path", default=RunConfig().model_path, help="the run config's model-path")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--l2", default="0.0001,0.001,0.01", help="regularisation strengths; the best is shown")
    args = parser.parse_args(argv)
    print("| data set | rows | max length | majority | probe accuracy (5-fold) | l2 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for spec in args.data:
        path, labels = data_spec(spec)
        data = load_labelled_text(
            path,
            text_column=args.text_column,
            label_column=args.label_column,
            labels=labels.split(",") if labels else None,
        )
        if len(data) > args.max_rows:
            data = data.subset(np.sort(np.random.default_rng(0).choice(len(data), args.max_rows, replace=False)))
        for max_length in (int(v) for v in args.max_length.split(",")):
            cfg = RunConfig.from_flower(
                {
                    **RunConfig().to_flower(),
                    "data-path": path,
                    "labels": labels,
                    "max-length": max_length,
                    "model-path": args.model_path,
                }
            )
            model = build_model(cfg, len(data.label_names))
            enc = encode(load_tokenizer(cfg.model_path), data.texts, data.labels, max_length=max_length)
            x, y = pooled_features(model, enc).float(), enc.labels
            majority = float((y == y.mode().values).float().mean())
            best = max((probe_accuracy(x, y, l2=float(l2)), float(l2)) for l2 in args.l2.split(","))
            print(f"| {Path(path).name} | {len(y):,} | {max_length} | {majority:.3f} | {best[0]:.3f} | {best[1]:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
