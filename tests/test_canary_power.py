"""The canary audit can fail: a run whose noise was skipped, but whose ledgers claim epsilon 8, is flagged.

Two sites train the tiny model for 2 rounds of 4 DP-SGD steps at Poisson rate 8/32 and noise multiplier
``SIGMA_8``, which the ledgers record: epsilon 8.0 at delta 1e-5 for this run. Steinke et al.'s (epsilon, delta)
bound cannot refute that claim at any number of canaries (at most about 5.9 at delta 1e-5); the audit must, when
the training skipped the noise as a bug would (the noise step monkeypatched out, the ledgers unchanged), and must
not when the noise was added. Canaries are white-box gradient canaries (:mod:`shared.gradient_canaries`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.audit.cli import canary_section
from shared.audit.verify import SiteAudit, audit_site_ledger
from shared.identity import IDENTITY_KEY_FILE, load_private_key, provision_simulation
from shared.ledger import SiteLedger, keyed_fingerprint_rows
from shared.privacy import DpEvent
from shared.site import LEDGER_FILE

DELTA = 1e-5
SIGMA_8 = 0.802  # 8 steps at rate 0.25 and this noise multiplier: epsilon 8.0 at delta 1e-5 (PLD)
ROWS, BATCH, STEPS, ROUNDS, SITES, CANARIES, CLIP = 32, 8, 4, 2, 2, 4000, 1.0
EVENT = DpEvent(sample_rate=BATCH / ROWS, noise_multiplier=SIGMA_8, steps=STEPS, clip_norm=CLIP)
RUN = "7"


def _ledgers(sim_dir: Path) -> dict[str, SiteAudit]:
    """Both sites' ledgers after run RUN as its sites record it: ROUNDS rounds of EVENT (epsilon 8 claimed)."""
    roster = provision_simulation(sim_dir, SITES)
    audits = {}
    for site_id in sorted(roster.keys):
        path = sim_dir / "sites" / site_id / LEDGER_FILE
        ledger = SiteLedger(path, site_id=site_id, signing_key=load_private_key(path.parent / IDENTITY_KEY_FILE))
        for server_round in range(1, ROUNDS + 1):
            ledger.append(
                run_id=RUN,
                server_round=server_round,
                adapter_hash="sha256:" + "0" * 64,
                dataset_fingerprint=keyed_fingerprint_rows([("a review", 1)], key=bytes(32)),
                event=EVENT,
                delta=DELTA,
                accountant="rdp",
            )
        audits[site_id] = audit_site_ledger(
            path, site_id=site_id, public_key=roster.public_key(site_id), site_delta=DELTA, site_accountant="rdp"
        )
    return audits


def test_every_guess_right_refutes_a_claim_of_epsilon_8(tmp_path):
    included = np.random.default_rng(0).random(CANARIES) < 0.5
    scores = {
        "delta": DELTA,
        "canaries": [
            {"index": i, "site": f"site-{i % SITES}", "included": bool(b), "score": float(b)}
            for i, b in enumerate(included)
        ],
    }

    section, findings = canary_section(
        scores, run_id=RUN, sites=_ledgers(tmp_path), confidence=0.95, where=tmp_path / "canary_scores.json"
    )

    assert [f.kind for f in findings] == ["canary"]
    assert section["epsilon_lower"] > 8.0 and section["epsilon_detectable"] > 8.0


# -- a run, trained in process: the tiny model, two sites, gradient canaries ---------------------------------


def _skip_the_noise(monkeypatch) -> None:
    """The bug: the optimizer's noise step adds nothing; the ledgers still record the calibrated noise."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    from client.dp_random import SourcedNoiseOptimizer

    def add_no_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = p.summed_grad.view_as(p).clone()
            _mark_as_processed(p.summed_grad)

    monkeypatch.setattr(SourcedNoiseOptimizer, "add_noise", add_no_noise)


def _train_run(cfg, sim_dir: Path, run_dir: Path, *, seed: int) -> Path:
    """ROUNDS rounds of both sites' local DP-SGD (the client's train_round, each site's canaries inserted and
    their audit coordinates recorded at the site), FedAvg of the updates; returns canary_scores.json."""
    import torch

    from client.train import train_round
    from shared.gradient_canaries import make_gradient_canaries, record_site_round, write_gradient_canary_scores
    from shared.model import encode, flatten, fresh_model, get_trainable, load_tokenizer, set_trainable, unflatten
    from tests.conftest import make_rows

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(cfg.model_path)
    data = []
    for s in range(SITES):
        rows = make_rows(ROWS, seed=seed + s)
        labels = np.array([int(label == "fresh") for _, label in rows])
        data.append(encode(tokenizer, [t for t, _ in rows], labels, max_length=cfg.max_length))
    canaries = make_gradient_canaries(CANARIES, num_sites=SITES, seed=seed)
    model = fresh_model(cfg, num_labels=2)
    global_arrays = get_trainable(model)
    for server_round in range(1, ROUNDS + 1):
        updates = []
        for s in range(SITES):
            set_trainable(model, global_arrays)
            before = flatten(global_arrays)
            result = train_round(
                model,
                data[s],
                steps=STEPS,
                batch_size=BATCH,
                learning_rate=cfg.learning_rate,
                dp=True,
                noise_multiplier=SIGMA_8,
                max_grad_norm=CLIP,
                seed=1000 * seed + 10 * server_round + s,
                optimizer_name="sgd",
                canaries=canaries.included_at(s),
            )
            assert result.event == EVENT  # what the ledgers record
            record_site_round(
                sim_dir / "sites" / f"site-{s}", run_id=RUN, server_round=server_round, values=result.canary_update
            )
            updates.append(flatten(get_trainable(model)) - before)
        global_arrays = unflatten(flatten(global_arrays) + np.mean(updates, axis=0), global_arrays)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_gradient_canary_scores(run_dir, run_id=RUN, seed=seed, canaries=canaries, sim_dir=sim_dir, delta=DELTA)


def _audit(path: Path, sites: dict[str, SiteAudit]):
    return canary_section(json.loads(path.read_text()), run_id=RUN, sites=sites, confidence=0.95, where=path)


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model: threads only contend
    yield
    torch.set_num_threads(threads)


def test_a_run_without_noise_that_claims_epsilon_8_is_flagged(tiny_config, tmp_path, monkeypatch):
    sites = _ledgers(tmp_path / "federation")
    _skip_the_noise(monkeypatch)

    path = _train_run(tiny_config, tmp_path / "federation", tmp_path / "run", seed=1)
    section, findings = _audit(path, sites)

    assert section["claimed_epsilon"] == pytest.approx(8.0, abs=0.05)
    assert [f.kind for f in findings] == ["canary"]
    assert f"exceeds the claimed epsilon {section['claimed_epsilon']:.3f}" in findings[0].message
    assert section["epsilon_lower"] > section["claimed_epsilon"]


def test_the_same_run_with_its_noise_passes(tiny_config, tmp_path):
    sites = _ledgers(tmp_path / "federation")

    path = _train_run(tiny_config, tmp_path / "federation", tmp_path / "run", seed=1)
    section, findings = _audit(path, sites)

    assert findings == []
    assert section["epsilon_lower"] <= section["claimed_epsilon"] < section["epsilon_detectable"]


def test_the_report_states_the_largest_epsilon_the_audit_can_refute(tmp_path):
    from shared.audit.report import _canary_html

    included = np.random.default_rng(0).random(CANARIES) < 0.5
    scores = {
        "delta": DELTA,
        "canaries": [
            {"index": i, "site": f"site-{i % SITES}", "included": bool(b), "score": 0.0} for i, b in enumerate(included)
        ],
    }
    section, _ = canary_section(
        scores, run_id=RUN, sites=_ledgers(tmp_path), confidence=0.95, where=tmp_path / "canary_scores.json"
    )

    page = _canary_html(section)

    assert f"can refute a claim of epsilon up to {section['epsilon_detectable']:.3f}" in page


def test_the_audit_command_prints_the_bound_its_reach_and_the_refutation(tmp_path, capsys):
    from shared.audit.cli import audit_main

    sites = _ledgers(tmp_path / "federation")
    run_dir = tmp_path / "run-7"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"run_id": RUN, "config": {"canaries": CANARIES}}))
    included = np.random.default_rng(0).random(CANARIES) < 0.5
    (run_dir / "canary_scores.json").write_text(
        json.dumps(
            {
                "kind": "gradient",
                "canaries": [
                    {"index": i, "site": f"site-{i % SITES}", "included": bool(b), "score": float(b)}
                    for i, b in enumerate(included)
                ],
            }
        )
    )

    code = audit_main(
        [
            "--sim-dir",
            str(tmp_path / "federation"),
            "--run-dir",
            str(run_dir),
            "--out",
            str(tmp_path),
            "--no-cross-check",
        ]
    )
    out, err = capsys.readouterr()

    assert code == 1 and sites  # the run has no run ledger either: that is an error of its own
    line = next(line for line in out.splitlines() if line.startswith("run 7: canary audit"))
    assert "(gradient canaries, 4000) | empirical epsilon >= " in line and "against the claimed 8.001" in line
    assert "it can refute a claim of at most 9." in line
    assert "ERROR run 7 canaries [canary]: empirical lower bound epsilon >= " in err
