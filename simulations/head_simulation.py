"""Why the head's input is centered: DP-FedAvg of a linear head on the frozen encoder's pooled vectors, in numpy.

The same federation as the default run (10 IID sites of the bundled reviews, 8 rounds, one Poisson-sampled
DP-SGD step per site per round at batch 256, per-sample clip 1, noise calibrated to epsilon 8 at delta 1e-5,
FedAvg of the site updates), but only the linear head is trained and the encoder is frozen, so that one setting
takes seconds instead of minutes. It prints the final test accuracy and macro-F1 per seed for a head on:

- the raw mean-pooled vector (``center-features = false``);
- the vector minus the exact mean of all sites' clipped vectors (a non-private oracle);
- the vector minus the DP estimate the app uses (each site's noisy mean at ``center-noise-multiplier``,
  averaged; its cost is in the noise calibration, as in the app).

    python simulations/head_simulation.py                       # the numbers in docs/benchmarks.md
    python simulations/head_simulation.py --seeds 5 --lrs 10

The pooled vectors are computed once with the real model (a few minutes on 2 cores) and cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.centering import ANSWER_SCALE, center_from_sum, query_event  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.privacy import DpEvent, calibrate_noise_multiplier  # noqa: E402

NUM_SITES = 10


def pooled_vectors(cfg: RunConfig, cache: Path) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Each site's pooled vectors and labels, and the test split's, under the frozen encoder (B = 0)."""
    if cache.is_file():
        saved = np.load(cache)
        sites = [(saved[f"x{i}"], saved[f"y{i}"]) for i in range(NUM_SITES)]
        return [x for x, _ in sites], [y for _, y in sites], saved["xt"], saved["yt"]
    from shared.federation import load_run_dataset, server_test_set, simulated_split
    from shared.model import build_model, encode, load_tokenizer, pooled_features

    data = load_run_dataset(cfg)
    parts, _ = simulated_split(cfg, data, NUM_SITES)
    tokenizer = load_tokenizer(cfg.model_path)
    model = build_model(cfg, len(data.label_names))

    def vectors(rows):  # type: ignore[no-untyped-def]
        enc = encode(tokenizer, rows.texts, rows.labels, max_length=cfg.max_length)
        return pooled_features(model, enc).numpy().astype(np.float64), enc.labels.numpy()

    sites = [vectors(data.subset(p)) for p in parts]
    xt, yt = vectors(server_test_set(cfg, data, NUM_SITES))
    arrays = {f"x{i}": x for i, (x, _) in enumerate(sites)} | {f"y{i}": y for i, (_, y) in enumerate(sites)}
    np.savez(cache, xt=xt, yt=yt, **arrays)
    return [x for x, _ in sites], [y for _, y in sites], xt, yt


def clipped_mean(x: np.ndarray, clip: float) -> np.ndarray:
    return (x * np.minimum(1.0, clip / np.linalg.norm(x, axis=1, keepdims=True))).mean(axis=0)


def simulate(
    xs: list[np.ndarray],
    ys: list[np.ndarray],
    xt: np.ndarray,
    yt: np.ndarray,
    *,
    centering: str,
    lr: float,
    cfg: RunConfig,
    seed: int,
) -> tuple[float, float]:
    """Final (accuracy, macro-F1) of DP-FedAvg on a linear head; ``centering`` in none / exact / dp."""
    rng = np.random.default_rng(seed)
    prior: tuple[DpEvent, ...] = ()
    center = np.zeros(xt.shape[1])
    if centering == "exact":
        center = clipped_mean(np.concatenate(xs), cfg.center_clip_norm)
    elif centering == "dp":
        # as the sites answer it (shared/centering.py): noisy sum of clipped vectors and noisy count, summed
        query = query_event(clip_norm=cfg.center_clip_norm, noise_multiplier=cfg.center_noise_multiplier)
        prior = (query,)
        total = sum(
            np.append(clipped_mean(x, cfg.center_clip_norm) * len(x), cfg.center_clip_norm * len(x))
            + rng.normal(0.0, query.noise_multiplier * query.clip_norm, x.shape[1] + 1)
            for x in xs
        )
        found, _ = center_from_sum(np.asarray(total) / ANSWER_SCALE, clip_norm=cfg.center_clip_norm)
        center = found if found is not None else center
    xs, xt = [x - center for x in xs], xt - center
    classes = int(max(y.max() for y in ys)) + 1
    width = xt.shape[1]
    q = cfg.batch_size / len(xs[0])
    sigma = calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        sample_rate=round(q, 6),
        steps=cfg.num_server_rounds,
        prior=prior,
    )
    bound = 1.0 / np.sqrt(width)
    weight, bias = rng.uniform(-bound, bound, (classes, width)), np.zeros(classes)
    for _ in range(cfg.num_server_rounds):
        d_weight, d_bias = np.zeros_like(weight), np.zeros_like(bias)
        for x, y in zip(xs, ys, strict=True):
            batch = rng.random(len(x)) < q  # Poisson sampling
            xb, yb = x[batch], y[batch]
            logits = xb @ weight.T + bias
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            g = p.copy()
            g[np.arange(len(yb)), yb] -= 1.0  # per-sample d loss / d logits
            g_weight = g[:, :, None] * xb[:, None, :]
            norms = np.sqrt((g_weight**2).sum(axis=(1, 2)) + (g**2).sum(axis=1))
            scale = np.minimum(1.0, cfg.max_grad_norm / np.maximum(norms, 1e-12))
            noisy_w = (g_weight * scale[:, None, None]).sum(0) + rng.normal(0, sigma * cfg.max_grad_norm, weight.shape)
            noisy_b = (g * scale[:, None]).sum(0) + rng.normal(0, sigma * cfg.max_grad_norm, bias.shape)
            d_weight -= lr * noisy_w / cfg.batch_size / len(xs)
            d_bias -= lr * noisy_b / cfg.batch_size / len(xs)
        weight, bias = weight + d_weight, bias + d_bias
    pred = (xt @ weight.T + bias).argmax(axis=1)
    f1 = [2 * ((pred == c) & (yt == c)).sum() / max(1, (pred == c).sum() + (yt == c).sum()) for c in range(classes)]
    return float((pred == yt).mean()), float(np.mean(f1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="3,10,30", help="client learning rates, comma-separated")
    parser.add_argument("--cache", type=Path, default=Path("runs/head-simulation-vectors.npz"))
    args = parser.parse_args(argv)
    cfg = RunConfig()
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    xs, ys, xt, yt = pooled_vectors(cfg, args.cache)
    norms = np.linalg.norm(np.concatenate(xs), axis=1)
    print(
        f"pooled vectors: norm mean {norms.mean():.2f} (min {norms.min():.2f}, max {norms.max():.2f}); "
        f"norm of their mean {np.linalg.norm(np.concatenate(xs).mean(axis=0)):.2f}; majority class "
        f"{max(np.mean(yt == c) for c in np.unique(yt)):.3f}"
    )
    print(f"{'head input':<44} {'lr':>5}  accuracy by seed        macro-F1 by seed")
    names = {
        "none": "raw mean-pooled vector",
        "exact": "minus the exact mean (non-private oracle)",
        "dp": f"minus the DP mean (noise multiplier {cfg.center_noise_multiplier:g})",
    }
    for centering, name in names.items():
        for lr in (float(v) for v in args.lrs.split(",")):
            runs = [simulate(xs, ys, xt, yt, centering=centering, lr=lr, cfg=cfg, seed=s) for s in range(args.seeds)]
            acc = " ".join(f"{a:.3f}" for a, _ in runs)
            f1 = " ".join(f"{f:.3f}" for _, f in runs)
            print(f"{name:<44} {lr:>5g}  {acc:<23} {f1}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
