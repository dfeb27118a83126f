"""``run_simulation``'s temp dir (``privatune-*``: Flower's home and Ray's files) is gone after the run, whether
it succeeded or failed, even though Flower's telemetry writes into it from a thread as the simulation ends.

Flower's runtime (``_run_simulation``) is replaced by a stand-in that ends the way flwr 1.41's does: its
``finally`` fires the exit event through Flower's real telemetry, whose daemon thread writes ``$FLWR_HOME/source``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from shared.config import RunConfig
from shared.simulation import run_simulation

TELEMETRY_DELAY_S = 0.3  # the telemetry thread's write, late enough to come after a removal that does not wait


@pytest.fixture()
def temp_dir(tmp_path, monkeypatch) -> Path:
    """TMPDIR for this test: where ``tempfile.mkdtemp`` puts the run's ``privatune-*`` dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return temp


@pytest.fixture()
def late_telemetry(monkeypatch) -> None:
    """Flower's telemetry as at the first event of a process (no source id read yet), its disk write a little late."""
    from flwr.supercore import telemetry

    monkeypatch.setitem(telemetry.state, "source", None)
    read_source_id = telemetry._get_source_id

    def late() -> str:
        time.sleep(TELEMETRY_DELAY_S)
        return read_source_id()

    monkeypatch.setattr(telemetry, "_get_source_id", late)


def flower_stand_in(monkeypatch, *, fail: bool) -> list[Future[str]]:
    """Replace Flower's simulation runtime; it writes the run's metrics (or fails) and fires the exit event in a
    ``finally``, as flwr's does. Returns the list that will hold the event's future."""
    from flwr.supercore.telemetry import event

    flwr_simulation = importlib.import_module("flwr.simulation.run_simulation")  # the module, not its function

    fired: list[Future[str]] = []

    def _run_simulation(**kwargs):
        try:
            if fail:
                raise RuntimeError("An error was encountered. Ending simulation.")
            cfg = RunConfig.from_flower(kwargs["server_app_context"].run_config)
            run_dir = cfg.run_dir(kwargs["run"].run_id)
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.json").write_text('{"rounds": []}')
        finally:
            fired.append(event(kwargs["exit_event"], event_details={"success": not fail}))

    monkeypatch.setattr(flwr_simulation, "_run_simulation", _run_simulation)
    return fired


def overrides(cfg: RunConfig) -> dict:
    flat = cfg.to_flower()
    keys = ("model-path", "data-path", "labels", "max-length", "output-dir", "batch-size", "local-steps")
    return {k: flat[k] for k in keys}


@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_the_simulations_temp_dir_is_removed_after_the_run(tiny_config, temp_dir, late_telemetry, monkeypatch, fail):
    monkeypatch.delenv("FLWR_HOME", raising=False)
    fired = flower_stand_in(monkeypatch, fail=fail)

    if fail:
        with pytest.raises(RuntimeError, match="Ending simulation"):
            run_simulation(overrides(tiny_config), num_clients=2)
    else:
        assert (run_simulation(overrides(tiny_config), num_clients=2) / "metrics.json").is_file()
    fired[0].result(timeout=10)  # the telemetry thread has finished writing

    assert list(temp_dir.iterdir()) == []
    assert "FLWR_HOME" not in os.environ  # not left pointing at a removed dir
