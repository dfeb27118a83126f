"""Load test of ``privatune serve`` on loopback: throughput and latency percentiles, bounded in count and time.

    python simulations/benchmark_serving.py                       # untrained MiniLM adapter, 4 clients
    python simulations/benchmark_serving.py --adapter runs/run-<id>/adapter --clients 8 --batch 8

The service runs as its own process (``privatune serve --port 0``, so client threads and server do not share
a GIL), with a fresh key file and a rate limit high enough not to refuse the load; ``--clients`` threads send
predict requests of ``--batch`` texts each over keep-alive connections until ``--requests`` have been sent or
``--seconds`` have passed, whichever comes first. Without ``--adapter`` an untrained adapter of the default
model (all-MiniLM-L6-v2, mean pooling, FFA-LoRA r=2) is made first: the same compute as a trained one.

Reported: requests answered by status, wall seconds, requests/s and texts/s, latency p50/p90/p99/max (ms).
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_TEXTS = (
    "a moving, beautifully acted film that earns every one of its quiet moments",
    "the plot is a mess and the jokes land with a thud",
    "sharp writing and a charming cast make this an easy recommendation",
    "tedious, overlong and strangely joyless",
)
SERVE_START_S = 180.0


@dataclass
class LoadResult:
    clients: int
    batch: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0) if self.latencies_s else float("nan")

    def summary(self) -> str:
        ok = self.statuses.get(200, 0)
        return (
            f"{self.requests} requests ({', '.join(f'{s}: {n}' for s, n in sorted(self.statuses.items()))}) "
            f"from {self.clients} clients, batch {self.batch}, in {self.seconds:.1f}s | "
            f"{self.requests / self.seconds:.1f} requests/s, {ok * self.batch / self.seconds:.1f} texts/s | "
            f"latency p50 {self.percentile_ms(50):.1f} ms, p90 {self.percentile_ms(90):.1f} ms, "
            f"p99 {self.percentile_ms(99):.1f} ms, max {self.percentile_ms(100):.1f} ms"
        )


def run_load(
    url: str, token: str, *, clients: int, max_requests: int, max_seconds: float, batch: int = 1
) -> LoadResult:
    """``clients`` threads post predict requests until ``max_requests`` are sent or ``max_seconds`` pass."""
    import httpx

    if clients < 1 or max_requests < 1 or max_seconds <= 0 or batch < 1:
        raise ValueError(f"need clients, requests, seconds, batch > 0, got {clients}, {max_requests}, {max_seconds}")
    tickets: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(max_requests):
        tickets.put(i)
    lock = threading.Lock()
    result = LoadResult(clients=clients, batch=batch, seconds=0.0)
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60.0) as http:
            while time.monotonic() < deadline:
                try:
                    i = tickets.get_nowait()
                except queue.Empty:
                    return
                texts = [SAMPLE_TEXTS[(i + j) % len(SAMPLE_TEXTS)] for j in range(batch)]
                started = time.perf_counter()
                status = http.post("/v1/predict", json={"texts": texts}).status_code
                elapsed = time.perf_counter() - started
                with lock:
                    result.latencies_s.append(elapsed)
                    result.statuses[status] = result.statuses.get(status, 0) + 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result


class ServeProcess:
    """``privatune serve --port 0`` in a child process; :attr:`url` once it listens. A context manager."""

    def __init__(self, adapter: Path, keys: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "shared.cli", "serve", "--adapter", str(adapter), "--keys", str(keys)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [*command, "--port", "0", *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        found: queue.SimpleQueue[str | None] = queue.SimpleQueue()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("serving on "):
                    found.put(line.split()[2])
            found.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            url = found.get(timeout=SERVE_START_S)
        except queue.Empty:
            url = None
        if url is None:
            self.close()
            raise RuntimeError("privatune serve did not start:\n" + "\n".join(self.lines[-30:]))
        return url

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def untrained_adapter(out: Path, model_path: str = "builtin:all-minilm-l6-v2") -> Path:
    """An adapter of the default run config on ``model_path``, saved as a run saves it (same compute as trained)."""
    from server.outputs import save_adapter
    from shared.config import RunConfig
    from shared.model import build_model

    cfg = RunConfig(model_path=model_path)
    model = build_model(cfg, num_labels=2)
    card = {
        "base_model": model_path,
        "classifier_pooling": cfg.classifier_pooling,
        "label_names": ["rotten", "fresh"],
        "max_length": cfg.max_length,
    }
    return save_adapter(model, out, card=card)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="An adapter directory (default: an untrained MiniLM one).")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent client threads (default 4).")
    parser.add_argument("--requests", type=int, default=2000, help="Most requests in all (default 2000).")
    parser.add_argument("--seconds", type=float, default=60.0, help="Most seconds of load (default 60).")
    parser.add_argument("--batch", type=int, default=1, help="Texts per request (default 1).")
    args = parser.parse_args()

    from server.serving.keys import create_key

    with tempfile.TemporaryDirectory(prefix="privatune-bench-") as scratch:
        adapter = Path(args.adapter) if args.adapter else untrained_adapter(Path(scratch))
        keys = Path(scratch) / "keys.json"
        token = create_key(keys, "load-test")
        limits = ["--rate-limit", "1e9", "--burst", "1000000000", "--max-batch", str(max(32, args.batch))]
        with ServeProcess(adapter, keys, *limits) as service:
            run_load(service.url, token, clients=1, max_requests=3, max_seconds=30.0, batch=args.batch)  # warm-up
            result = run_load(
                service.url,
                token,
                clients=args.clients,
                max_requests=args.requests,
                max_seconds=args.seconds,
                batch=args.batch,
            )
    print(f"cpus {os.cpu_count()} | adapter {'given' if args.adapter else 'untrained all-MiniLM-L6-v2'}")
    print(result.summary())
    return 0 if result.statuses.get(200, 0) == result.requests else 1


if __name__ == "__main__":
    sys.exit(main())
