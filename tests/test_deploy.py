"""Flower's deployment engine on loopback with real TLS and SuperNode authentication: one SuperLink and three
SuperNodes as separate processes. Enrolled as in a real deployment: each site makes its own keys
(``site init``), the coordinator provisions from the sites' requests only, each site approves (pins and
countersigns) the roster from its bundle after the roll call, the coordinator hands every countersignature back
in the bundles and each site installs them; each site has its own node config.

Every process is started in its own session and its whole process group is killed in teardown (Flower's
SuperLink and SuperNodes each start a SuperExec child, which starts the app processes).

Each site's operator approves the app (this repository's FAB, as ``flwr run`` builds it) before its SuperNode
starts, as docs/deploy.md says: every run below but the tampered one runs that approved app (from a copy of the
repository made when it was approved: an edit to the working tree while the tests run would make another app,
which every site refuses).
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

from shared.app_approval import approve_app, build_app, review_app
from shared.countersignature import COUNTERSIGNATURE_FILE
from shared.enrolment import approve_roster, init_site, review_roster
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


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by kill -9 (Linux prctl), so a
    killed pytest leaves no SuperLink or SuperNode behind (their SuperExecs exit with their parent)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, **QUIET_FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}:{os.environ['PATH']}"}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal this process, its group and every descendant by PID (Flower's SuperExec children start their
        own sessions), then SIGKILL whatever is left."""
        import psutil

        try:
            family = [psutil.Process(self.popen.pid), *psutil.Process(self.popen.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

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
    app: Path  # the app every site approved: what flwr run sends
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
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
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
        """The documented way, ``privatune site start`` (with ``extra`` flower-supernode arguments: the command
        it execs, with them)."""
        site_dir, port = bundle or self.sites[site], free_port()
        if extra:
            return self.start(f"node-{site}", supernode_command(site_dir, self.address, runtime_port=port) + extra)
        cli = ["site", "start", str(site_dir), "--superlink", self.address, "--runtime-port", str(port)]
        return self.start(f"node-{site}", [sys.executable, "-m", "shared.cli", *cli])

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


def copy_app(dest: Path) -> Path:
    """This project's files (those a FAB may take), copied to ``dest``."""
    import shutil

    ignore = shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".flwr", ".venv", "runs")
    return Path(shutil.copytree(REPO, dest, ignore=ignore))


def submit(fed: Federation, config: dict, name: str, *, app: Path | None = None) -> tuple[Proc, Path]:
    """``flwr run`` the app (default: the approved one) with this run config, streaming the ServerApp's log to a
    file."""
    path = fed.root / f"{name}.toml"
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
    command = [str(BIN / "flwr"), "run", str(app or fed.app), "--run-config", str(path), "--stream"]
    proc = fed.start(f"run-{name}", command)
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
    enrolled = {site: init_site(site, root / "sites" / site) for site in SITES}  # at each site: its own keys
    requests = [enrolled[site].request_path for site in SITES]  # all the coordinator gets: public keys
    made = provision(root / "fed", requests, superlink_hosts=["127.0.0.1"], port=port)
    site_dirs = {site: enrolled[site].site_dir for site in SITES}
    for site, site_dir in site_dirs.items():  # at each site: its operator approves the roster in its bundle,
        review = review_roster(site_dir, made.bundle_dirs[site])  # every other operator having read the same code
        approve_roster(review, confirmed=review.others)
    countersignatures = [site_dir / COUNTERSIGNATURE_FILE for site_dir in site_dirs.values()]
    made = provision(
        root / "fed", requests, superlink_hosts=["127.0.0.1"], port=port, countersignatures=countersignatures
    )
    for site, site_dir in site_dirs.items():  # the same roster again: installs every site's countersignature
        review = review_roster(site_dir, made.bundle_dirs[site], expected_fingerprint=made.roster_fingerprint)
        approve_roster(review, confirmed=review.others)
    app = copy_app(root / "privatune")  # the app the coordinator will run, as it stands now
    fab = root / "privatune.fab"  # what the coordinator sends each site: that app as flwr run builds it
    fab.write_bytes(build_app(app).content)
    for site_dir in site_dirs.values():  # at each site: its operator approves it
        approve_app(review_app(site_dir, fab))
    for i, site_dir in enumerate(site_dirs.values()):
        write_csv(site_dir / "data.csv", make_rows(48, seed=10 + i))
        config = (site_dir / NODE_CONFIG_FILE).read_text().replace("max-epsilon = 8.0", "max-epsilon = 100.0")
        (site_dir / NODE_CONFIG_FILE).write_text(config + "allow-reproducible-noise = true\n")
    write_csv(root / "server-eval.csv", make_rows(40, seed=99))
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text((made.coordinator_dir / FLWR_CONFIG_FILE).read_text())
    federation = Federation(root, made.coordinator_dir, site_dirs, port, flwr_home, root / "state.db", app)
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


def _tampered_app(dest: Path, marker: Path) -> Path:
    """This project with one line added to the ClientApp's module (``client/app.py``): as soon as a site imports
    it, it writes to ``marker``: the coordinator's stand-in for "send this site's rows" (it defeats secure
    aggregation, DP and the ledger at once)."""
    copy_app(dest)
    module = dest / "client" / "app.py"
    head, tail = module.read_text().split("from __future__ import annotations\n", 1)
    line = f"open({str(marker)!r}, 'a').write('the rows of this site\\n')\n"
    module.write_text(f"{head}from __future__ import annotations\n{line}{tail}")
    return dest


def test_every_site_refuses_an_app_changed_after_its_approval_before_any_line_of_it_runs(fed, tiny_model_dir, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from shared.identity import sha256_hex

    marker = tmp_path / "exfiltrated.txt"
    tampered = _tampered_app(tmp_path / "privatune", marker)
    tampered_hash = sha256_hex(build_fab_from_disk(tampered))
    nodes = {site: fed.procs[f"node-{site}"] for site in SITES}
    before = {site: node.text().count(tampered_hash) for site, node in nodes.items()}
    config = run_config(fed, tiny_model_dir, **{"num-server-rounds": 1, "center-features": False})

    proc, _ = submit(fed, config, "tampered", app=tampered)

    for site, node in nodes.items():  # each SuperNode says why, naming the offered app and the changed file
        deadline = time.monotonic() + 120
        while node.text().count(tampered_hash) == before[site]:
            assert time.monotonic() < deadline, f"{site} did not name the tampered app:\n{node.text()}"
            time.sleep(0.5)
        refusal = next(line for line in node.text().splitlines()[::-1] if tampered_hash in line)
        assert "is not approved by this site's operator" in refusal, refusal
        assert "client/app.py" in refusal and "approve-app" in refusal, refusal
    wait_for(proc, "adapter saved to", timeout=300)  # the server's rounds end with no site taking part
    assert not marker.exists(), marker.read_text()  # not one line of the tampered app ran at any site
    assert "could not be verified" in proc.text()  # the coordinator is told each site refused the app


def _bundle_copy(fed: Federation, site: str, dest: Path) -> Path:
    import shutil

    shutil.copytree(fed.sites[site], dest)
    return dest


def _refused(fed: Federation, proc: Proc, timeout: float = 120) -> str:
    try:
        code = proc.popen.wait(timeout=timeout)
    finally:
        proc.stop()
    assert code != 0, proc.text()
    assert fed.online_nodes() == len(SITES)
    return proc.text()


def _raw_supernode(fed: Federation, bundle: Path) -> list[str]:
    """flower-supernode for ``bundle`` without ``privatune site start``'s checks (which would refuse it first)."""
    return [
        "flower-supernode",
        "--superlink", fed.address,
        "--root-certificates", str(bundle / "ca.pem"),
        "--auth-supernode-private-key", str(bundle / "node_auth_key"),
        "--node-config", str(bundle / NODE_CONFIG_FILE),
        "--port", str(free_port()),
        "--max-retries", "2",
    ]  # fmt: skip


def test_unregistered_node_is_refused(fed, tmp_path):
    from shared.provision import NODE_AUTH_KEY, NODE_AUTH_PUB, make_node_auth_key

    bundle = _bundle_copy(fed, "hospital-a", tmp_path / "intruder")
    private, public = make_node_auth_key()  # a valid key pair that the coordinator never registered
    (bundle / NODE_AUTH_KEY).write_bytes(private)
    (bundle / NODE_AUTH_PUB).write_bytes(public)

    log = _refused(fed, fed.start("intruder", _raw_supernode(fed, bundle)))

    assert "Failed to activate SuperNode" in log


def test_node_trusting_another_ca_is_refused(fed, tmp_path):
    x = init_site("x", tmp_path / "x")
    other = provision(tmp_path / "other", [x.request_path], superlink_hosts=["127.0.0.1"], port=fed.port)
    bundle = _bundle_copy(fed, "hospital-a", tmp_path / "other-ca")
    (bundle / "ca.pem").write_bytes((other.coordinator_dir / "ca.pem").read_bytes())

    log = _refused(
        fed, fed.start_supernode("other-ca", bundle=bundle, extra=["--max-retries", "2", "--max-wait-time", "20"])
    )

    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log


def test_node_with_a_key_of_the_wrong_type_is_refused(fed, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    bundle = _bundle_copy(fed, "hospital-a", tmp_path / "wrong-key")
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    (bundle / "node_auth_key").write_bytes(key)

    log = _refused(fed, fed.start("wrong-key", _raw_supernode(fed, bundle)))

    assert "Unable to parse the private key file" in log


def test_site_refuses_a_run_config_asking_for_another_data_path(fed, tiny_model_dir):
    config = run_config(fed, tiny_model_dir, **{"num-server-rounds": 1, "data-path": "/srv/other-hospital.csv"})

    proc, _ = submit(fed, config, "other-data-path")
    wait_for(proc, "adapter saved to", timeout=300)

    log = proc.text()
    for site in SITES:
        assert f"{site} declined: site {site} refuses the run: run config data-path='/srv/other-hospital.csv'" in log


def _node_config(fed: Federation, site: str, ledger: Path) -> dict:
    """The site's node config on a copy of its ledger, head record and witness at ``ledger``: the site refuses a
    fresh ledger where its witness (or its fingerprint key) says it had one, and the real ledger stays as it is."""
    import shutil
    import tomllib

    from shared.ledger_head import default_head_path
    from shared.site import LEDGER_WITNESS_FILE

    real = fed.sites[site] / "privacy_ledger.jsonl"
    witness = ledger.with_name(ledger.stem + "-witness.json")
    shutil.copyfile(real, ledger)
    shutil.copyfile(default_head_path(real), default_head_path(ledger))
    shutil.copyfile(fed.sites[site] / LEDGER_WITNESS_FILE, witness)
    node_config = tomllib.loads((fed.sites[site] / NODE_CONFIG_FILE).read_text())
    return {**node_config, "ledger-path": str(ledger), "ledger-witness": str(witness)}


def reference_arrays(fed: Federation, config: dict, scratch: Path) -> dict:
    """The uninterrupted run, recomputed in this process: every site's own train handler each round, the mean of
    the updates (what the secure sum decodes to, up to its fixed-point resolution), the server optimizer's step.
    A centered run (the default) starts with round 0, the feature-mean query, whose mean every round then sends."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.app import train
    from server.optimizer import ServerOptimizer
    from shared import constants as C
    from shared.config import RunConfig
    from shared.model import build_model, flatten, get_trainable, unflatten
    from shared.records import record_from_arrays
    from shared.updates import mean_from_sum

    cfg = RunConfig.from_flower(config)
    global_arrays = get_trainable(build_model(cfg, num_labels=2))
    server_opt = ServerOptimizer(kind=cfg.server_optimizer, learning_rate=cfg.server_learning_rate, tau=cfg.server_tau)
    contexts = {
        site: Context(
            run_id=1,
            node_id=i + 1,
            node_config=_node_config(fed, site, scratch / f"{site}.jsonl"),
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )
        for i, site in enumerate(SITES)
    }

    def mean_reply(server_round: int, task: str, center=None):
        total = None
        for context in contexts.values():
            train_config = {C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: "1", C.KEY_TASK: task}
            content = RecordDict(
                {C.GLOBAL_RECORD: record_from_arrays(global_arrays), C.TRAIN_CONFIG_RECORD: ConfigRecord(train_config)}
            )
            if center is not None:
                content[C.CENTER_RECORD] = record_from_arrays({C.CENTER_ARRAY: center})
            reply = train(Message(content, dst_node_id=context.node_id, message_type="train"), context)
            assert C.UPDATE_RECORD in reply.content.array_records, f"{context.node_id} declined round {server_round}"
            update = reply.content[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy().astype("float64")
            total = update if total is None else total + update
        return mean_from_sum(total, float(len(SITES)))

    center = None
    if cfg.center_features:  # round 0 sums (noisy vector sum, noisy count) answers: the center is their ratio
        from server.app import center_is_usable
        from shared.centering import center_from_sum

        answers = mean_reply(0, C.TASK_FEATURE_MEAN).astype("float64")
        center, rows = center_from_sum(answers, clip_norm=cfg.center_clip_norm)
        if center is not None and not center_is_usable(cfg, center, rows=rows or 0.0, sites=len(SITES))[0]:
            center = None  # the server trains on the uncentered vector when the center is mostly noise
    for server_round in range(1, cfg.num_server_rounds + 1):
        step = server_opt.step(mean_reply(server_round, C.TASK_TRAIN, center))
        global_arrays = unflatten(flatten(global_arrays) + step, global_arrays)
    return dict(global_arrays)


def _ledger_rounds(path: Path) -> list[tuple[str, int]]:
    return [(e["run_id"], e["round"]) for e in map(json.loads, path.read_text().splitlines()) if "round" in e]


def test_server_killed_in_round_2_of_3_resumes_and_matches_an_uninterrupted_run(fed, tiny_model_dir, tmp_path):
    from server.checkpoint import load_checkpoint
    from shared.audit.cli import audit_main

    config = run_config(fed, tiny_model_dir, **{"num-server-rounds": 3, "reproducible-noise": True})
    before = run_dirs(fed)
    interrupted, _ = submit(fed, config, "interrupted")
    wait_for(interrupted, "round 1/3 | test loss", timeout=300)  # round 1 done (not its "running" line)
    (first,) = run_dirs(fed) - before
    time.sleep(4)  # round 2 under way: keys advertised
    fed.procs["superlink"].stop(signal.SIGKILL)  # kill -9 of the SuperLink and the ServerApp process it started
    interrupted.stop()
    assert load_checkpoint(first).server_round == 1

    fed.start_superlink()  # same state database: registrations survive; the SuperNodes reconnect by themselves
    fed.wait_online(len(SITES), timeout=180)
    before = run_dirs(fed)
    resumed, _ = submit(fed, {**config, "resume": str(first)}, "resumed")
    wait_for(resumed, "adapter saved to", timeout=500)
    (second,) = run_dirs(fed) - before

    final = load_checkpoint(second)
    assert final.server_round == 3 and final.lineage == [first.name.removeprefix("run-")]
    assert [r["round"] for r in json.loads((second / "metrics.json").read_text())["rounds"]] == [1, 2, 3]
    reference = reference_arrays(fed, config, tmp_path)
    for name, value in reference.items():
        assert abs(final.arrays[name] - value).max() < 1e-4, name
    for site in SITES:  # every training once: the lost round 2 stays in the ledger, the redone one is new
        rounds = _ledger_rounds(fed.sites[site] / "privacy_ledger.jsonl")
        assert len(rounds) == len(set(rounds))
        assert [r for run, r in rounds if run == second.name.removeprefix("run-")] == [2, 3]
    ledgers = [
        arg for site in SITES for arg in ("--ledger", str(fed.sites[site] / "privacy_ledger.jsonl"), "--site-id", site)
    ]
    audit = ["--roster", str(fed.coordinator / "roster.json"), "--run-dir", str(first), "--run-dir", str(second)]
    assert audit_main([*ledgers, *audit, "--out", str(tmp_path / "audit"), "--no-cross-check"]) == 0


def test_a_client_killed_mid_round_makes_a_three_site_round_abort_and_reveal_nothing(fed, tiny_model_dir):
    """With 3 sites, a site killed after the keys are shared leaves 2 survivors: below every site's minimum cohort
    (3 by default: with 2, each would learn the other's update from the sum), so they refuse to sign the survivor
    set and nothing is unmasked; the run goes on (secagg-on-abort = skip). The dropout path that recovers the sum
    needs more sites and is tested through real Flower messages in tests/test_secagg_flower.py."""
    victim = "lab-c"
    node = fed.procs[f"node-{victim}"]
    config = run_config(fed, tiny_model_dir, **{"num-server-rounds": 1, "secagg-timeout": 25.0})
    before = run_dirs(fed)
    already = node.text().count("Sent successfully")
    proc, _ = submit(fed, config, "dropout")
    deadline = time.monotonic() + 300
    # the five secagg stages of round 0 (the feature-mean query), then round 1's keys advertised and shares sent
    while node.text().count("Sent successfully") < already + 5 + 2:
        assert time.monotonic() < deadline, node.text()
        time.sleep(0.2)
    node.stop(signal.SIGKILL)

    wait_for(proc, "adapter saved to", timeout=300)

    (run_dir,) = run_dirs(fed) - before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics["feature_centering"]["survivors"]) == sorted(SITES)
    (record,) = metrics["rounds"]
    assert record["aborted"] and victim in record["dropped"] and record["survivors"] == []
    assert "secagg round 1 ABORTED, nothing revealed" in proc.text()
