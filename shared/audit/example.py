"""A small synthetic federation on disk, written through the real ledgers: for the tests, and to look at a
report without training anything (``python -m shared.audit.example DIR`` then ``privatune audit``).

The layout is the simulation's: ``<root>/federation/{roster.json, sites/site-<i>/...}`` and one run directory
per run, ``<root>/run-<id>/{metrics.json, run_ledger.jsonl}``. Site ``site-<n-1>`` has a small budget, so it
declines the later rounds, as a real client would.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.budget import decide
from server.run_ledger import RunLedger
from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, load_private_key, provision_simulation
from shared.ledger import RUN_LEDGER_FILE, SiteLedger, digest_array, keyed_fingerprint_rows, load_fingerprint_key
from shared.privacy import DpEvent
from shared.site import FINGERPRINT_KEY_FILE, LEDGER_FILE, write_site_settings

DELTA = 1e-5
ACCOUNTANT = "prv"


@dataclass(frozen=True)
class ExampleFederation:
    sim_dir: Path
    run_dirs: list[Path]
    site_ids: list[str]

    @property
    def roster_path(self) -> Path:
        return self.sim_dir / ROSTER_FILE

    def ledger_path(self, site_id: str) -> Path:
        return self.sim_dir / "sites" / site_id / LEDGER_FILE

    def key_path(self, site_id: str) -> Path:
        return self.sim_dir / "sites" / site_id / IDENTITY_KEY_FILE


def write_example_federation(
    root: Path,
    *,
    num_sites: int = 3,
    runs: int = 2,
    rounds: int = 3,
    small_budget: float = 1.2,
    accountant: str = ACCOUNTANT,
    secure_aggregation: bool = False,
    seed: int = 0,
) -> ExampleFederation:
    """Write sites, ledgers, run ledgers and metrics as a DP run of ``runs`` x ``rounds`` would."""
    root = Path(root)
    sim_dir = root / "federation"
    roster = provision_simulation(sim_dir, num_sites)
    site_ids = sorted(roster.keys)
    rng = np.random.default_rng(seed)
    event = DpEvent(sample_rate=0.02, noise_multiplier=1.0, steps=25, clip_norm=1.0)
    ledgers = {
        s: SiteLedger(
            sim_dir / "sites" / s / LEDGER_FILE,
            site_id=s,
            signing_key=load_private_key(sim_dir / "sites" / s / IDENTITY_KEY_FILE),
        )
        for s in site_ids
    }
    budgets = {s: (small_budget if s == site_ids[-1] else float("inf")) for s in site_ids}
    fingerprints = {
        s: keyed_fingerprint_rows(
            [(f"row {i} of {s}", i % 2) for i in range(200)],
            key=load_fingerprint_key(sim_dir / "sites" / s / FINGERPRINT_KEY_FILE),
        )
        for s in site_ids
    }
    for s in site_ids:  # each site's own delta and accountant, pinned as a simulated site pins them
        write_site_settings(sim_dir / "sites" / s, {"delta": DELTA, "accountant": accountant})
    run_dirs = []
    for r in range(runs):
        run_id = f"{1000 + r}"
        run_dir = root / f"run-{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        run_ledger = RunLedger(run_dir / RUN_LEDGER_FILE, run_id, roster=roster)
        accuracy = 0.5
        metrics: dict = {
            "run_id": run_id,
            "config": {"delta": DELTA, "accountant": accountant, "secure-aggregation": secure_aggregation},
            "initial_test": {"accuracy": accuracy, "loss": 0.69},
            "rounds": [],
        }
        for server_round in range(1, rounds + 1):
            attestations, declined, clients = {}, {}, {}
            for s in site_ids:
                ledger = ledgers[s]
                decision = decide(
                    ledger.history("default"),
                    event,
                    max_epsilon=budgets[s],
                    delta=DELTA,
                    accountant=accountant,
                )
                if not decision.accept:
                    declined[s] = decision.reason
                    continue
                entry = ledger.append(
                    run_id=run_id,
                    server_round=server_round,
                    adapter_hash=digest_array(rng.normal(size=8)),
                    dataset_fingerprint=fingerprints[s],
                    event=event,
                    delta=DELTA,
                    accountant=accountant,
                    max_epsilon=budgets[s],
                )
                attestations[s] = ledger.attestation(entry)
                clients[s] = {"epsilon": entry.epsilon}  # under DP a site releases no train loss
            accuracy = min(0.95, accuracy + float(rng.uniform(0.02, 0.08)))
            test = {"accuracy": accuracy, "loss": 1.0 - accuracy, "macro_f1": accuracy - 0.01}
            trained = sorted(attestations)
            run_ledger.record_round(
                server_round,
                participants=site_ids,
                declined=declined,
                survivors=trained,
                dropped=[],
                aborted=not trained,
                aggregate_hash=digest_array(rng.normal(size=8)) if trained else None,
                attestations=attestations,
                metrics=test,
                secure_aggregation=secure_aggregation,
            )
            metrics["rounds"].append(
                {
                    "round": server_round,
                    "test": test,
                    "clients": clients,
                    "declined": declined,
                    "seconds": 1.0,
                }
            )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_dirs.append(run_dir)
    return ExampleFederation(sim_dir=sim_dir, run_dirs=run_dirs, site_ids=site_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a small synthetic federation to audit.")
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    fed = write_example_federation(args.root)
    runs = " ".join(f"--run-dir {d}" for d in fed.run_dirs)
    print(f"privatune audit --sim-dir {fed.sim_dir} {runs} --out {args.root / 'audit'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
