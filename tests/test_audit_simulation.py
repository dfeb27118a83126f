"""``privatune audit`` on what a real simulation leaves on disk (Flower simulation, tiny model, DP on).

Two runs (plain, then with secure aggregation) share one simulation directory, so the sites' ledgers span
both runs: the audit must verify every chain and attestation, and compose each site's epsilon over both.
"""

from __future__ import annotations

import json

import pytest

from shared.audit.cli import audit_main
from shared.simulation import run_simulation
from tests.conftest import simulation_overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_audit_of_two_simulated_runs_verifies_and_composes_over_both(tiny_config, tmp_path, capsys):
    sim_dir = tmp_path / "federation"
    run_dirs = [
        run_simulation(
            simulation_overrides(tiny_config, **{"sim-dir": str(sim_dir), "secure-aggregation": secure}), num_clients=3
        )
        for secure in (False, True)
    ]
    capsys.readouterr()

    args = ["--sim-dir", str(sim_dir), "--out", str(tmp_path / "audit")]
    for d in run_dirs:
        args += ["--run-dir", str(d)]
    status = audit_main(args)

    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert status == 0, capsys.readouterr().err
    assert [s["site_id"] for s in report["sites"]] == ["site-0", "site-1", "site-2"]
    for site in report["sites"]:
        (data_set,) = site["data_sources"].values()
        assert data_set["rounds"] == 6 and len(data_set["runs"]) == 2  # per run: the centering query, 2 rounds
        assert all(e["matches"] for e in site["entries"])
        assert data_set["epsilon_pld"] == pytest.approx(data_set["epsilon"], rel=0.01)
    assert [[row["round"] for row in r["rounds"]] for r in report["runs"]] == [[0, 1, 2], [0, 1, 2]]
    assert all(r["verified"] for r in report["runs"])
    assert [r["secure_aggregation"] for r in report["runs"]] == [False, True]
    assert any(s.startswith("Secure aggregation (run(s)") for s in report["guarantee"])
