"""Flower's deployment engine on loopback with real TLS and SuperNode authentication: one SuperLink and three
SuperNodes as separate processes, provisioned by ``privatune provision``, each site with its own node config.

Every process is started in its own session and its whole process group is killed in teardown (Flower's
SuperLink and SuperNodes each start a SuperExec child, which starts the app processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.provision import (
    FLWR_CONFIG_FILE,
    NODE_CONFIG_FILE,
    QUIET_FLOWER_ENV,
    provision,
    superlink_command,
    supernode_command,
)
from tests.conftest import make_rows, write_csv

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITES = ("hospital-a", "clinic-b", "lab-c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, **QUIET_FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}:{os.environ['PATH']}"}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal this process's own group (it and the children it started), then make sure they are gone."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # children left behind by the group leader

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Federation:
    root: Path
    coordinator: Path
    sites: dict[str, Path]
    port: int
    flwr_home: Path
    database: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, command: list[str]) -> Proc:
        log = self.root / "logs" / f"{name}-{len(list((self.root / 'logs').glob(name + '*')))}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(self.flwr_home),
                cwd=self.root,
                start_new_session=True,
            )
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def start_superlink(self) -> Proc:
        proc = self.start(
            "superlink", superlink_command(self.coordinator, database=self.database, host="127.0.0.1", port=self.port)
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return proc
            assert proc.popen.poll() is None, f"SuperLink exited:\n{proc.text()}"
            time.sleep(0.3)
        raise AssertionError(f"SuperLink did not listen on {self.port}:\n{proc.text()}")

    def start_supernode(self, site: str, *, bundle: Path | None = None, extra: list[str] | None = None) -> Proc:
        command = supernode_command(bundle or self.sites[site], self.address, runtime_port=free_port())
        return self.start(f"node-{site}", command + (extra or []))

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            capture_output=True,
            text=True,
            env=_env(self.flwr_home),
            cwd=self.root,
            timeout=timeout,
        )

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "list", "--format", "json")
        with contextlib.suppress(json.JSONDecodeError):
            return sum(n["status"] == "online" for n in json.loads(out.stdout)["nodes"])
        return 0

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            assert time.monotonic() < deadline, f"fewer than {count} SuperNodes online; logs in {self.root / 'logs'}"
            time.sleep(1)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def run_config(fed: Federation, tiny_model_dir: Path, **overrides) -> dict:
    cfg = {
        "num-server-rounds": 2,
        "min-train-nodes": 3,
        "model-path": str(tiny_model_dir),
        "labels": "rotten,fresh",
        "eval-data-path": str(fed.root / "server-eval.csv"),
        "max-length": 16,
        "batch-size": 8,
        "local-steps": 2,
        "max-test-examples": 40,
        "learning-rate": 0.5,
        "target-epsilon": 8.0,
        "secagg-timeout": 60.0,
        "roster-path": str(fed.coordinator / "roster.json"),
        "output-dir": str(fed.root / "runs"),
    }
    return {**cfg, **overrides}


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def submit(fed: Federation, config: dict, name: str) -> tuple[Proc, Path]:
    """``flwr run`` the project with this run config, streaming the ServerApp's log to a file."""
    path = fed.root / f"{name}.toml"
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
    proc = fed.start(f"run-{name}", [str(BIN / "flwr"), "run", str(REPO), "--run-config", str(path), "--stream"])
    return proc, path


def wait_for(proc: Proc, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.text():
        assert proc.popen.poll() is None or needle in proc.text(), (
            f"{proc.name} ended without {needle!r}:\n{proc.text()}"
        )
        assert time.monotonic() < deadline, f"no {needle!r} from {proc.name} after {timeout:.0f}s:\n{proc.text()}"
        time.sleep(0.5)


def run_dirs(fed: Federation) -> set[Path]:
    return set((fed.root / "runs").glob("run-*"))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    made = provision(root / "fed", list(SITES), superlink_hosts=["127.0.0.1"], port=port)
    for i, site_dir in enumerate(made.site_dirs.values()):
        write_csv(site_dir / "data.csv", make_rows(48, seed=10 + i))
        config = (site_dir / NODE_CONFIG_FILE).read_text().replace("max-epsilon = 8.0", "max-epsilon = 100.0")
        (site_dir / NODE_CONFIG_FILE).write_text(config + "allow-reproducible-noise = true\n")
    write_csv(root / "server-eval.csv", make_rows(40, seed=99))
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text((made.coordinator_dir / FLWR_CONFIG_FILE).read_text())
    federation = Federation(root, made.coordinator_dir, dict(made.site_dirs), port, flwr_home, root / "state.db")
    try:
        federation.start_superlink()
        for site in SITES:
            out = federation.flwr("supernode", "register", str(made.coordinator_dir / "node-keys" / f"{site}.pub"))
            assert out.returncode == 0, out.stdout + out.stderr
        for site in SITES:
            federation.start_supernode(site)
        federation.wait_online(len(SITES))
        yield federation
    finally:
        federation.stop_all()


def test_two_rounds_with_dp_and_secure_aggregation_over_tls(fed, tiny_model_dir):
    before = run_dirs(fed)
    proc, _ = submit(fed, run_config(fed, tiny_model_dir), "two-rounds")

    wait_for(proc, "adapter saved to", timeout=300)

    (run_dir,) = run_dirs(fed) - before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(sorted(r["survivors"]) == sorted(SITES) and not r["aborted"] for r in metrics["rounds"])
    assert all(r["secure_aggregation"] for r in metrics["rounds"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
