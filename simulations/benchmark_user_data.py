"""A user's first run on their own data, with every default: the real stack on data sets and federation sizes.

Each cell is ``privatune simulate`` as a user runs it (Flower's simulation runtime, Opacus at every site, secure
aggregation, the ledgers), with nothing set but the data, the number of sites and rounds: ``--rows`` rows drawn
at random from the file (seeded; all of them when it has fewer), IID sites. It prints one line per cell, the
table of docs/benchmarks.md: rows, test rows, the majority-class baseline, the final round's and the best
round's accuracy / macro-F1 on the server's held-out split, the largest site epsilon, the warnings of the
final model, and wall seconds.

    python simulations/benchmark_user_data.py --data builtin:rotten-tomatoes:rotten,fresh --data tweets.csv \\
        --cells 5x3,3x3,10x3 --rows 500,3400
    python simulations/benchmark_user_data.py --data my.csv --cells 5x3 --set learning-rate=3

``--data PATH[:LABELS]``: a .csv/.jsonl/.parquet with columns ``text`` and ``label`` (or builtin:...), and
optionally the label set in class order after the last colon (comma-separated; default: inferred).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import RunConfig  # noqa: E402
from shared.data import load_labelled_text  # noqa: E402
from shared.federation import load_run_dataset, server_test_set  # noqa: E402
from shared.simulation import run_simulation  # noqa: E402


def data_spec(spec: str) -> tuple[str, str]:
    """``PATH[:LABELS]`` -> (path, labels); a builtin name keeps its own colon."""
    head, sep, tail = spec.rpartition(":")
    if sep and "," in tail:
        return head, tail
    return spec, ""


def draw_rows(path: str, labels: str, rows: int, seed: int, out: Path) -> int:
    """Write ``rows`` rows of the data set drawn at random (all of them when it has fewer) to ``out``, as a
    text,label CSV; returns how many."""
    data = load_labelled_text(
        path, text_column="text", label_column="label", labels=labels.split(",") if labels else None
    )
    if len(data) > rows:
        data = data.subset(np.sort(np.random.default_rng(seed).choice(len(data), rows, replace=False)))
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, data.label_names[label]) for text, label in zip(data.texts, data.labels, strict=True))
    return len(data)


def cell(path: Path, labels: str, *, sites: int, rounds: int, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """One run with the defaults: the server's held-out numbers, final and best round, and what it warned."""
    started = time.monotonic()
    config = {"data-path": str(path), "num-server-rounds": rounds, "output-dir": str(out), **overrides}
    if labels:
        config["labels"] = labels
    run_dir = run_simulation(config, num_clients=sites, estimate_time=True)  # the preflight logs its estimate
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = RunConfig.from_flower(metrics["config"])
    final = metrics["rounds"][-1]
    best = metrics.get("best") or {}
    return {
        "test_rows": len(server_test_set(cfg, load_run_dataset(cfg), sites)),
        "majority": metrics.get("majority_baseline", {}),
        "rounds": [(r["test"]["accuracy"], r["test"]["macro_f1"]) for r in metrics["rounds"]],
        "final": final["test"],
        "best_round": best.get("round"),
        "best": best.get("test", {}),
        "epsilon": max((c["epsilon"] for c in final["clients"].values() if c.get("epsilon") is not None), default=None),
        "warnings": metrics.get("final_warnings", []),
        "seconds": time.monotonic() - started,
    }


def row(name: str, rows: int, sites: int, rounds: int, r: dict[str, Any]) -> str:
    maj, fin, best = r["majority"], r["final"], r["best"]
    eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
    return (
        f"| {name} | {rows:,} | {sites} x {rounds} | {r['test_rows']} | {maj.get('accuracy', 0):.3f} / "
        f"{maj.get('macro_f1', 0):.3f} | **{fin['accuracy']:.3f} / {fin['macro_f1']:.3f}** | {r['best_round']} "
        f"({best.get('accuracy', 0):.3f} / {best.get('macro_f1', 0):.3f}) | {eps} | "
        f"{'; '.join(r['warnings']) or '-'} | {r['seconds']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="PATH[:LABELS], repeatable")
    parser.add_argument("--cells", default="5x3", help="SITESxROUNDS, comma-separated")
    parser.add_argument("--rows", default="3400", help="rows drawn per data set, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row draw")
    parser.add_argument("--set", action="append", default=[], help="a run-config override KEY=TOML-VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    overrides = {k: v for item in args.set for k, v in tomllib.loads(item).items()}
    RunConfig.from_flower({**RunConfig().to_flower(), **overrides})  # a bad --set fails here, before any run
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    print(
        "| data set | rows | sites x rounds | test rows | majority: accuracy / macro-F1 | final | best round |"
        " max site epsilon | final model's warnings | seconds |\n"
        "| --- | ---: | --- | ---: | --- | --- | --- | ---: | --- | ---: |",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="user-data-") as tmp:
        for spec in args.data:
            path, labels = data_spec(spec)
            for rows in (int(v) for v in args.rows.split(",")):
                drawn = Path(tmp) / f"{len(results)}.csv"
                count = draw_rows(path, labels, rows, args.seed, drawn)
                for sites, rounds in cells:
                    result = cell(
                        drawn, labels, sites=sites, rounds=rounds, overrides=overrides, out=Path(tmp) / "runs"
                    )
                    print(row(Path(path).name, count, sites, rounds, result), flush=True)
                    results.append({"data": spec, "rows": count, "sites": sites, "rounds": rounds, **result})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
