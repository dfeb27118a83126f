"""Gradient canaries: drawn from the run's seed, inserted into each DP step at the site, recorded there, scored."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from shared.audit.canary import CanaryError
from shared.gradient_canaries import (
    gradient_canary_scores,
    make_gradient_canaries,
    read_site_rounds,
    record_site_round,
    site_canaries,
    site_canary_path,
    write_gradient_canary_scores,
)
from shared.site import site_from_node_config

# -- the canaries


def test_canaries_are_reproducible_from_the_seed_and_differ_with_it():
    a, b = make_gradient_canaries(50, num_sites=3, seed=7), make_gradient_canaries(50, num_sites=3, seed=7)
    c = make_gradient_canaries(50, num_sites=3, seed=8)

    assert np.array_equal(a.sites, b.sites) and np.array_equal(a.included, b.included)
    assert not (np.array_equal(a.sites, c.sites) and np.array_equal(a.included, c.included))


def test_each_canary_is_inserted_with_probability_one_half_at_a_uniform_site():
    canaries = make_gradient_canaries(4000, num_sites=4, seed=1)

    assert stats.binomtest(int(canaries.included.sum()), 4000, 0.5).pvalue > 0.001
    assert stats.chisquare(np.bincount(canaries.sites, minlength=4)).pvalue > 0.001
    assert np.array_equal(canaries.included_at(2), canaries.included[canaries.sites == 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"m": 0}, "canaries must be a positive integer, got 0"), ({"num_sites": 0}, "num_sites must be >= 1, got 0")],
)
def test_bad_canary_parameters_are_errors(kwargs, message):
    args = {"m": 10, "num_sites": 2, "seed": 0} | kwargs
    m = args.pop("m")

    with pytest.raises(CanaryError, match=message):
        make_gradient_canaries(m, **args)


def test_a_deployed_site_refuses_canaries(tmp_path):
    node = {"site-id": "hospital-a", "site-dir": str(tmp_path), "data-path": "x.csv", "delta": 1e-5}
    site = site_from_node_config({**node, "accountant": "prv", "labels": "rotten,fresh"}, sim_dir=tmp_path)

    with pytest.raises(CanaryError, match="canary mode is for simulations only; site 'hospital-a' is a deployed"):
        site_canaries(10, seed=0, site=site)


# -- the site's record and the scores


def test_a_site_records_each_round_once(tmp_path):
    record_site_round(tmp_path, run_id="5", server_round=1, values=np.array([-0.5, 0.0]))
    record_site_round(tmp_path, run_id="5", server_round=2, values=np.array([0.25, -1.0]))

    rounds = read_site_rounds(site_canary_path(tmp_path, "5"))

    assert sorted(rounds) == [1, 2] and rounds[2].tolist() == [0.25, -1.0]
    with pytest.raises(CanaryError, match="round 2 of run 5 is already recorded"):
        record_site_round(tmp_path, run_id="5", server_round=2, values=np.array([0.0, 0.0]))


def test_a_damaged_record_is_an_error_naming_the_line(tmp_path):
    record_site_round(tmp_path, run_id="5", server_round=1, values=np.array([1.0]))
    path = site_canary_path(tmp_path, "5")
    path.write_text(path.read_text() + '{"round": 2}\n')

    with pytest.raises(CanaryError, match=r"run-5.jsonl line 2: not a canary round record"):
        read_site_rounds(path)


def test_a_canary_scores_how_far_its_coordinate_moved_against_its_gradient(tmp_path):
    canaries = make_gradient_canaries(12, num_sites=2, seed=3)
    first, second = canaries.at(0), canaries.at(1)
    steps = {0: {1: -np.arange(len(first), dtype=float), 2: np.full(len(first), -1.0)}}

    scores = gradient_canary_scores(canaries, steps)  # site 1 never trained

    assert scores[first].tolist() == (np.arange(len(first)) + 1.0).tolist()
    assert not scores[second].any()
    with pytest.raises(CanaryError, match=f"site-0 recorded 1 canary coordinates in round 1, but has {len(first)}"):
        gradient_canary_scores(canaries, {0: {1: np.zeros(1)}})


def test_the_scores_file_is_what_the_audit_reads(tmp_path):
    canaries = make_gradient_canaries(8, num_sites=2, seed=3)
    for partition in (0, 1):
        site_dir = tmp_path / "federation" / "sites" / f"site-{partition}"
        record_site_round(site_dir, run_id="9", server_round=1, values=-np.ones(len(canaries.at(partition))))

    path = write_gradient_canary_scores(
        tmp_path, run_id="9", seed=3, canaries=canaries, sim_dir=tmp_path / "federation", delta=1e-5
    )
    payload = json.loads(path.read_text())

    assert payload["kind"] == "gradient" and payload["delta"] == 1e-5
    assert [c["site"] for c in payload["canaries"]] == [f"site-{s}" for s in canaries.sites]
    assert [c["included"] for c in payload["canaries"]] == canaries.included.tolist()
    assert all(c["score"] == 1.0 for c in payload["canaries"])


# -- inside the DP step


def _round(tiny_config, included, **kwargs):
    from client.train import train_round
    from shared.model import encode, fresh_model, load_tokenizer
    from tests.conftest import make_rows

    rows = make_rows(32)
    data = encode(
        load_tokenizer(tiny_config.model_path),
        [t for t, _ in rows],
        np.array([int(label == "fresh") for _, label in rows]),
        max_length=16,
    )
    options = {"steps": 4, "batch_size": 8, "learning_rate": 0.5, "dp": True, "noise_multiplier": 1.0}
    return train_round(
        fresh_model(tiny_config, num_labels=2),
        data,
        max_grad_norm=1.0,
        seed=11,
        optimizer_name="sgd",
        canaries=included,
        **(options | kwargs),
    )


def test_without_noise_only_inserted_canaries_move_one_clipped_gradient_per_draw(tiny_config, monkeypatch):
    from opacus.optimizers.optimizer import _mark_as_processed

    from client.dp_random import SourcedNoiseOptimizer

    def add_no_noise(self):
        for p in self.params:
            p.grad = p.summed_grad.view_as(p).clone()
            _mark_as_processed(p.summed_grad)

    monkeypatch.setattr(SourcedNoiseOptimizer, "add_noise", add_no_noise)
    included = np.random.default_rng(0).random(400) < 0.5

    result = _round(tiny_config, included, micro_batch_size=3)

    draws = -result.canary_update / (0.5 * 1.0 / 8)  # SGD: lr x clip norm / expected batch, per draw
    assert not result.canary_update[~included].any()
    assert np.allclose(draws, np.round(draws), atol=1e-4) and draws.min() > -1e-4 and draws.max() < 4 + 1e-4
    assert 0.9 * 400 / 2 * 4 * 0.25 < draws.sum() < 1.1 * 400 / 2 * 4 * 0.25  # a quarter of the inserted, per step


def test_with_noise_every_coordinate_moves_and_the_event_is_the_rows_own(tiny_config):
    included = np.random.default_rng(0).random(400) < 0.5

    result = _round(tiny_config, included)

    assert np.all(result.canary_update != 0.0)
    assert (result.event.sample_rate, result.event.steps, result.event.noise_multiplier) == (0.25, 4, 1.0)


def test_gradient_canaries_need_dp(tiny_config):
    with pytest.raises(ValueError, match="gradient canaries audit DP-SGD: they need dp = true"):
        _round(tiny_config, np.ones(4, dtype=bool), dp=False, noise_multiplier=0.0)


@pytest.mark.slow  # two sites' rounds through the ClientApp (their PRV ledgers) and the audit
def test_sites_record_their_canaries_and_the_server_scores_them_all_for_the_audit(tiny_config, tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import client.app as client_app
    from server.app import start_canaries
    from shared import constants as C
    from shared.audit.cli import canary_section
    from shared.audit.verify import audit_site_ledger
    from shared.identity import provision_simulation
    from shared.model import build_model, get_trainable
    from shared.records import record_from_arrays

    cfg = replace(tiny_config, canaries=300, noise_multiplier=1.0, target_epsilon=0.0, local_steps=2)
    roster = provision_simulation(cfg.simulation_dir(77), 2)
    scorer = start_canaries(cfg, None, build_model(cfg, 2), None, num_sites=2, run_id="77")
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: "77"}),
        }
    )
    for partition in (0, 1):
        context = Context(
            run_id=77,
            node_id=100 + partition,
            node_config={"partition-id": partition, "num-partitions": 2},
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )
        reply = client_app.app(Message(content, dst_node_id=100 + partition, message_type="train"), context)
        assert not reply.has_error(), reply.error
        # the coordinates stay at the site: the reply carries what it did without canaries
        assert set(reply.content) == {C.METRICS_RECORD, C.DP_EVENT_RECORD, C.ATTESTATION_RECORD, C.UPDATE_RECORD}

    path = scorer.finish(None, tmp_path, run_id="77", seed=cfg.seed, delta=cfg.delta)
    scores = json.loads(path.read_text())
    sites = {
        s: audit_site_ledger(
            cfg.simulation_dir(77) / "sites" / s / "privacy_ledger.jsonl", site_id=s, public_key=roster.public_key(s)
        )
        for s in ("site-0", "site-1")
    }
    section, findings = canary_section(scores, run_id="77", sites=sites, confidence=0.95, where=path)

    assert len(scores["canaries"]) == 300 and scores["kind"] == "gradient"
    assert all(c["score"] != 0.0 for c in scores["canaries"])  # every site trained: noise on every coordinate
    assert findings == [] and section["kind"] == "gradient" and not section["refuted"]
    assert section["claimed_from"] == "the DP events of run 77 in the site ledgers"
