"""Which defaults learn on data users bring: DP-FedAvg of the head on frozen features, over data sets and
(sites, rounds, rows) grids, in numpy (seconds per setting; the real stack takes minutes).

The federation is the app's: the same split (``shared.partition``: a held-out test split of ``test-fraction``,
at most ``max-test-examples`` rows, IID sites), the same Poisson sample rate (``1 / ceil(rows / batch)``), the
noise calibrated as the sites do it (``shared.privacy.calibrate_noise_multiplier`` over rounds x local steps, the
centering query as prior event), the centering answer of ``shared.centering``, per-sample clipping of the head's
gradient, the server's update clip and optimizer. The encoder is frozen (only the head is trained), so it
shows what the head's hyper-parameters do, not what LoRA adds.

    python simulations/utility_grid.py --data builtin:rotten-tomatoes --data tweets.csv --data drugs.csv
    python simulations/utility_grid.py --data my.csv --preset default --sites 3,5,10 --rounds 3,10 --rows 500,5000
    python simulations/utility_grid.py --data my.csv --set fast:learning_rate=3,local_steps=8   # the defaults, changed

It prints, per data set, preset and grid cell, the majority-class accuracy and the mean final and best-round
accuracy and macro-F1 over ``--seeds``, and the fraction of runs whose final model predicts one class.
Pooled vectors are computed once per data file with the real model and cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.app import CENTER_MAX_ERROR  # noqa: E402
from shared.centering import ANSWER_SCALE, center_from_sum, query_event  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.partition import iid_partitions, train_test_split  # noqa: E402
from shared.privacy import DpEvent, calibrate_noise_multiplier  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """The head's hyper-parameters under test (the run-config keys of the same names)."""

    learning_rate: float = 10.0
    local_steps: int = 1
    batch_size: int = 256
    center_noise_multiplier: float = 20.0
    center_clip_norm: float = 5.0
    center_features: bool = True
    center_max_error: float = 0.0  # > 0: drop a center whose expected error norm exceeds this share of its norm
    server_momentum: float = 0.0  # FedAvgM: 0 = plain FedAvg
    update_clip_norm: float = 5.0
    target_epsilon: float = 8.0


def _defaults() -> Preset:
    cfg = RunConfig()
    return Preset(
        learning_rate=cfg.learning_rate,
        local_steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        center_noise_multiplier=cfg.center_noise_multiplier,
        center_clip_norm=cfg.center_clip_norm,
        center_features=cfg.center_features,
        center_max_error=CENTER_MAX_ERROR,
        update_clip_norm=cfg.update_clip_norm,
        target_epsilon=cfg.target_epsilon,
    )


PRESETS = {
    "old": Preset(),  # the defaults before 2026-12-01: 1 local step, center noise multiplier 20, no center check
    "default": _defaults(),  # today's run-config defaults
    "nonprivate": replace(_defaults(), target_epsilon=0.0),  # the same without DP noise on the training steps
}


def features(
    data_path: str, labels: str, cache: Path, max_rows: int, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled vectors (frozen encoder, B = 0) and label indices of up to ``max_rows`` rows of the file, each row
    cut at ``max_length`` tokens (None: the run config's default)."""
    over = {"data-path": data_path, "labels": labels, **({"max-length": max_length} if max_length else {})}
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **over})
    key = hashlib.sha256(f"{data_path}|{labels}|{max_rows}|{cfg.model_path}|{cfg.max_length}".encode()).hexdigest()
    path = cache / f"features-{key[:16]}.npz"
    if path.is_file():
        saved = np.load(path)
        return saved["x"], saved["y"]
    from shared.data import load_labelled_text
    from shared.model import build_model, encode, load_tokenizer, pooled_features

    data = load_labelled_text(
        cfg.data_path, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.label_names
    )
    if len(data) > max_rows:
        data = data.subset(np.sort(np.random.default_rng(0).choice(len(data), max_rows, replace=False)))
    model = build_model(cfg, len(data.label_names))
    enc = encode(load_tokenizer(cfg.model_path), data.texts, data.labels, max_length=cfg.max_length)
    x = pooled_features(model, enc).numpy().astype(np.float64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=enc.labels.numpy())
    return x, enc.labels.numpy()


def _clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    return x * np.minimum(1.0, clip / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def _metrics(pred: np.ndarray, y: np.ndarray, classes: int) -> tuple[float, float]:
    f1 = [2 * ((pred == c) & (y == c)).sum() / max(1, (pred == c).sum() + (y == c).sum()) for c in range(classes)]
    return float((pred == y).mean()), float(np.mean(f1))


def simulate(
    x: np.ndarray, y: np.ndarray, *, sites: int, rounds: int, rows: int, preset: Preset, seed: int
) -> dict[str, float]:
    """One private run: final and best-round test accuracy / macro-F1, and whether the final model is one-class."""
    cfg = RunConfig()
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(rows, len(x)), replace=False))
    x, y = x[pick], y[pick]
    train, test = train_test_split(len(x), test_fraction=cfg.test_fraction, seed=seed)
    if len(test) > cfg.max_test_examples:
        test = np.sort(rng.choice(test, cfg.max_test_examples, replace=False))
    parts = [train[p] for p in iid_partitions(len(train), sites, seed=seed)]
    classes = int(y.max()) + 1
    xs, ys = [x[p] for p in parts], [y[p] for p in parts]
    # round 0: each site's noisy clipped sum and noisy count, summed (shared/centering.py)
    clip = preset.center_clip_norm
    query = query_event(clip_norm=clip, noise_multiplier=preset.center_noise_multiplier)
    total = sum(
        np.append(_clip_rows(xi, clip).sum(0), clip * len(xi))
        + rng.normal(0.0, query.noise_multiplier * query.clip_norm, x.shape[1] + 1)
        for xi in xs
    )
    center, noisy_rows = center_from_sum(np.asarray(total) / ANSWER_SCALE, clip_norm=clip)
    if center is not None and preset.center_max_error > 0:
        error = query.noise_multiplier * query.clip_norm * math.sqrt(sites * x.shape[1]) / noisy_rows
        if error > preset.center_max_error * float(np.linalg.norm(center)):
            center = None
    center = np.zeros(x.shape[1]) if center is None or not preset.center_features else center
    xs, xt, yt = [xi - center for xi in xs], x[test] - center, y[test]
    width = x.shape[1]
    sigmas, rates = [], []
    for xi in xs:
        q = 1.0 / math.ceil(len(xi) / min(preset.batch_size, len(xi)))
        prior: tuple[DpEvent, ...] = (query,) if preset.center_features else ()
        sigmas.append(
            0.0
            if preset.target_epsilon <= 0  # non-private reference
            else calibrate_noise_multiplier(
                target_epsilon=preset.target_epsilon,
                delta=cfg.delta,
                sample_rate=q,
                steps=preset.local_steps * rounds,
                prior=prior,
            )
        )
        rates.append(q)
    bound = 1.0 / np.sqrt(width)
    theta = np.concatenate([rng.uniform(-bound, bound, classes * width), np.zeros(classes)])
    velocity = np.zeros_like(theta)
    best = (-1.0, 0.0)
    final = (0.0, 0.0)
    one_class = False
    for _ in range(rounds):
        updates = []
        for xi, yi, sigma, q in zip(xs, ys, sigmas, rates, strict=True):
            local = theta.copy()
            expected = q * len(xi)
            for _step in range(preset.local_steps):
                w, b = local[: classes * width].reshape(classes, width), local[classes * width :]
                batch = rng.random(len(xi)) < q
                xb, yb = xi[batch], yi[batch]
                logits = xb @ w.T + b
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                g = p.copy()
                g[np.arange(len(yb)), yb] -= 1.0
                gw = g[:, :, None] * xb[:, None, :]
                norms = np.sqrt((gw**2).sum(axis=(1, 2)) + (g**2).sum(axis=1))
                scale = np.minimum(1.0, cfg.max_grad_norm / np.maximum(norms, 1e-12))
                grad = np.concatenate([(gw * scale[:, None, None]).sum(0).ravel(), (g * scale[:, None]).sum(0)])
                grad = (grad + rng.normal(0, sigma * cfg.max_grad_norm, grad.shape)) / expected
                local = local - preset.learning_rate * grad
            update = local - theta
            norm = np.linalg.norm(update)
            updates.append(update * min(1.0, preset.update_clip_norm / max(norm, 1e-12)))
        mean = np.mean(updates, axis=0)
        velocity = preset.server_momentum * velocity + mean
        theta = theta + velocity
        w, b = theta[: classes * width].reshape(classes, width), theta[classes * width :]
        pred = (xt @ w.T + b).argmax(axis=1)
        final = _metrics(pred, yt, classes)
        one_class = len(np.unique(pred)) == 1
        if final[0] > best[0]:
            best = final
    majority = max(float(np.mean(yt == c)) for c in range(classes))
    return {"majority": majority, "final": final[0], "final_f1": final[1], "best": best[0], "one_class": one_class}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="data file (or builtin:...); repeatable")
    parser.add_argument("--labels", action="append", default=None, help="labels per --data ('' = sorted)")
    parser.add_argument("--preset", action="append", default=None, help=f"one of {sorted(PRESETS)} (default all)")
    parser.add_argument("--set", action="append", default=[], help="extra preset: name:key=value,key=value")
    parser.add_argument("--sites", default="3,5,10")
    parser.add_argument("--rounds", default="3,10")
    parser.add_argument("--rows", default="500,5000")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-rows", type=int, default=5000)
    parser.add_argument("--cache", type=Path, default=Path("runs/utility-grid"))
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the run config's)")
    args = parser.parse_args(argv)
    presets = dict(PRESETS)
    for spec in args.set:
        name, _, pairs = spec.partition(":")
        values = {k: float(v) for k, v in (p.split("=") for p in pairs.split(","))}
        if "local_steps" in values:
            values["local_steps"] = int(values["local_steps"])
        if "center_features" in values:
            values["center_features"] = bool(values["center_features"])
        if "batch_size" in values:
            values["batch_size"] = int(values["batch_size"])
        presets[name] = replace(_defaults(), **values)  # type: ignore[arg-type]  # today's defaults, changed
    chosen = args.preset or sorted(presets)
    labels = args.labels or [""] * len(args.data)
    grid = list(itertools.product(*(tuple(int(v) for v in s.split(",")) for s in (args.sites, args.rounds, args.rows))))
    for data_path, label_list in zip(args.data, labels, strict=True):
        x, y = features(data_path, label_list, args.cache, args.max_rows, args.max_length)
        print(f"\n{data_path}: {len(x)} rows, {int(y.max()) + 1} classes")
        print(f"{'preset':<12} {'sites':>5} {'rounds':>6} {'rows':>5}  majority  final  (F1)   best   one-class")
        for name in chosen:
            summary = []
            for sites, rounds, rows in grid:
                runs = [
                    simulate(x, y, sites=sites, rounds=rounds, rows=rows, preset=presets[name], seed=s)
                    for s in range(args.seeds)
                ]
                mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
                summary.append(mean["final"] - mean["majority"])
                print(
                    f"{name:<12} {sites:>5} {rounds:>6} {rows:>5}  {mean['majority']:.3f}     {mean['final']:.3f}"
                    f" ({mean['final_f1']:.3f}) {mean['best']:.3f}  {mean['one_class']:.2f}",
                    flush=True,
                )
            print(f"{name:<12} mean gain over majority {np.mean(summary):+.3f}, worst {np.min(summary):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
