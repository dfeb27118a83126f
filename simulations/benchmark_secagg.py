"""Benchmark the secure-aggregation protocol in process against the plain sum of the same vectors.

    python simulations/benchmark_secagg.py --dim 1000000 --n 10 50 100 --dropout 0 0.3

For each (n, dropout) one round runs with the default degree and threshold (all five stages, the consistency
check included). Dropped clients leave after the share-keys stage (they never send their masked input): the
costliest case for the server, which must rebuild their mask keys and regenerate every pairwise mask they
shared with a survivor. They are spread evenly over
the ring so that no neighbourhood falls below the threshold; the abort probability under *random* dropouts
is estimated separately (graph only, no crypto) and printed in a second table.

Reported per client: seconds (mean over the clients that sent an input) and bytes uploaded (all stages,
values plus record keys, the masked vector as a .npy payload), against the float32 cleartext update.
Reported for the server: seconds over all stages, against summing the same n float32 vectors in float64.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.secagg import constants as K  # noqa: E402
from shared.secagg.graph import neighbours  # noqa: E402
from shared.secagg.inprocess import ARRAY_HEADER_BYTES, Meter, make_clients, run_round  # noqa: E402
from shared.secagg.messages import RoundParams  # noqa: E402
from shared.secagg.server import SecAggServer  # noqa: E402
from shared.secagg.settings import SecAggSettings, consistency_quorum  # noqa: E402


def update_for(nid: int, dim: int, clip: float) -> np.ndarray:
    rng = np.random.default_rng(nid)
    u = rng.normal(size=dim).astype(np.float32)
    return u * np.float32(0.9 * clip / float(np.linalg.norm(u)))


def spread(ring: list[int], fraction: float) -> set[int]:
    """round(n * fraction) nodes evenly spaced on the ring."""
    n = len(ring)
    return {ring[i] for i in range(n) if math.floor((i + 1) * fraction) > math.floor(i * fraction)}


def bench(n: int, dropout: float, *, dim: int, clip: float, sim_dir: Path) -> dict[str, float]:
    ids = list(range(1, n + 1))
    clients, roster = make_clients(sim_dir, ids)
    settings = SecAggSettings(clip_norm=clip, max_clients=max(n, 2))
    params = RoundParams.for_round(settings, run_id="bench", server_round=1, node_ids=ids)
    server = SecAggServer(params, roster=roster)

    dropped: set[int] = set()

    def leaving(s: SecAggServer) -> set[int]:  # the ring is seeded by the advert set: known after stage 1
        dropped.update(spread(s.ring(), dropout))
        return dropped

    meter = Meter()
    started = time.perf_counter()
    run_round(
        server,
        clients,
        lambda nid: update_for(nid, dim, clip),
        drop={K.STAGE_MASKED_INPUT: leaving},
        meter=meter,
    )
    wall = time.perf_counter() - started
    result = server.result()
    survivors = result.survivors

    plain = np.zeros(dim, dtype=np.float64)
    plain_seconds = 0.0
    for nid in survivors:
        u = update_for(nid, dim, clip)
        t0 = time.perf_counter()
        plain += u
        plain_seconds += time.perf_counter() - t0
    error = float(np.max(np.abs(result.total - plain)))
    assert error <= len(survivors) * result.resolution, error

    cleartext = 4 * dim
    return {
        "n": n,
        "k": params.degree,
        "t": params.threshold,
        "dropout": dropout,
        "dropped": len(dropped),
        "client_s": float(np.mean([meter.client_seconds[i] for i in survivors])),
        "server_s": meter.server_seconds,
        "plain_server_s": plain_seconds,
        "upload_bytes": float(np.mean([meter.uploaded[i] for i in survivors])),
        "plain_upload_bytes": cleartext + ARRAY_HEADER_BYTES,
        "ratio": float(np.mean([meter.uploaded[i] for i in survivors])) / cleartext,
        "download_bytes": float(np.mean([meter.downloaded[i] for i in survivors])),
        "max_error": error,
        "resolution": result.resolution,
        "wall_s": wall,
    }


def abort_probability(n: int, dropout: float, *, trials: int, degree: int | None = None, seed: int = 0) -> float:
    """Chance that independent dropouts (each client with probability ``dropout``, after share-keys) abort:
    fewer than ``max(2, t, q)`` survivors, or a neighbourhood below the threshold."""
    s = SecAggSettings(clip_norm=1.0, max_clients=max(n, 2), degree=degree)
    ids = list(range(1, n + 1))
    k, t = s.degree_for(n), s.threshold_for(n)
    q = consistency_quorum(n, t)
    graph = neighbours(ids, degree=k, seed=b"abort-estimate")
    rng = np.random.default_rng(seed)
    aborts = 0
    for _ in range(trials):
        alive = {i for i in ids if rng.random() >= dropout}
        ok = len(alive) >= max(2, t, q)
        ok = ok and all(len(graph[u] & alive) + 1 >= t for u in alive)
        ok = ok and all(len(graph[v] & alive) >= t for v in set(ids) - alive)
        aborts += not ok
    return aborts / trials


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1_000_000, help="floats per update")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100], help="clients per round")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.3], help="fraction dropping")
    ap.add_argument("--clip", type=float, default=5.0, help="update clip norm C (the run default)")
    ap.add_argument("--trials", type=int, default=2000, help="Monte Carlo trials for the abort estimate")
    args = ap.parse_args(argv)

    print(f"dim = {args.dim:,} floats ({4 * args.dim / 1e6:.1f} MB as float32), clip norm C = {args.clip}\n")
    print(
        "| n | k | t | dropped | client s | server s | plain sum s | upload / client | plain upload "
        "| ratio | download / client | max abs error | resolution |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for d in args.dropout:
            with tempfile.TemporaryDirectory() as tmp:
                r = bench(n, d, dim=args.dim, clip=args.clip, sim_dir=Path(tmp))
            print(
                f"| {r['n']} | {r['k']} | {r['t']} | {r['dropped']} ({d:.0%}) | {r['client_s']:.3f} "
                f"| {r['server_s']:.2f} | {r['plain_server_s']:.3f} | {r['upload_bytes'] / 1e6:.4f} MB "
                f"| {r['plain_upload_bytes'] / 1e6:.4f} MB | {r['ratio']:.4f} "
                f"| {r['download_bytes'] / 1e3:.1f} kB "
                f"| {r['max_error']:.2e} | {r['resolution']:.2e} |",
                flush=True,
            )
    print("\nAbort probability with independent random dropouts (default t, quorum q; estimated on the graph alone):\n")
    print("| n | k | t | q | 10% dropout | 30% dropout | k' = 2k | t' | 10%, k' | 30%, k' |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    s = SecAggSettings(clip_norm=1.0)
    for n in args.n:
        k, t = s.degree_for(n), s.threshold_for(n)
        wide = SecAggSettings(clip_norm=1.0, degree=2 * k)
        k2, t2 = wide.degree_for(n), wide.threshold_for(n)
        p = [abort_probability(n, d, trials=args.trials, degree=dk) for dk in (None, 2 * k) for d in (0.1, 0.3)]
        print(
            f"| {n} | {k} | {t} | {consistency_quorum(n, t)} | {p[0]:.3f} | {p[1]:.3f} | {k2} | {t2} "
            f"| {p[2]:.3f} | {p[3]:.3f} |"
        )


if __name__ == "__main__":
    main()
