"""`flwr run . local` as the README has it: a connection file without Flower 1.41's deprecated `options.*`,
and the local SuperLink stopped by its PID (found by its FLWR_HOME), never by a pattern over every process."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stopper():
    spec = importlib.util.spec_from_file_location("stop_local_superlink", ROOT / "simulations/stop_local_superlink.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _process(proc: Path, pid: int, *argv: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_the_flwr_config_sets_a_local_superlink_without_deprecated_options():
    from flwr.cli.flower_config import parse_superlink_connection

    config = tomllib.loads((ROOT / "simulations/flwr-config.toml").read_text())
    connection = parse_superlink_connection(config["superlink"]["local"], "local")

    assert config["superlink"]["default"] == "local"
    assert connection.address == ":local:"
    assert connection.options is None  # `options.*` makes flwr 1.41 print a deprecation warning


def test_only_the_superlink_of_this_flwr_home_is_found(tmp_path):
    stopper = _stopper()
    proc, home = tmp_path / "proc", tmp_path / "home" / ".flwr"
    log = str(home / "local-superlink" / "superlink.log")
    python = "/venv/bin/python3.11"
    _process(proc, 101, python, "/venv/bin/flower-superlink", "--insecure", "--log-file", log, "--simulation")
    _process(
        proc, 102, python, "/venv/bin/flower-superlink", "--log-file", "/other/.flwr/local-superlink/superlink.log"
    )
    _process(proc, 103, python, "/venv/bin/flower-superexec", "--log-file", log)  # not a SuperLink
    _process(proc, 104, "/usr/bin/less", log)  # someone reading its log
    (proc / "self").mkdir()

    assert stopper.local_superlink_pids(home, proc=proc) == [101]


def test_flwr_home_is_read_from_the_environment(monkeypatch, tmp_path):
    stopper = _stopper()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "x"))

    assert stopper.flwr_home() == tmp_path / "x"


def test_nothing_running_is_said_and_is_not_an_error(monkeypatch, tmp_path, capsys):
    stopper = _stopper()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / f"nobody-{os.getpid()}"))

    assert stopper.main([]) == 0
    assert "no local SuperLink of" in capsys.readouterr().out


def test_the_readme_activates_the_venv_and_stops_nothing_by_pattern():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### With Flower's own CLI") : readme.index("## Serve the tuned model")]

    assert ". .venv/bin/activate" in section
    assert "--federation-config" in section
    assert "python simulations/stop_local_superlink.py" in section
    assert not re.search(r"\b(pkill|killall)\b", readme)
