"""Distributed DP through the real ServerApp, secagg mod and train handler, over the in-process grid."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import client.app as client_app
from client.secagg_mod import secagg_mod
from server.secagg_workflow import aggregate_secure
from shared import constants as C
from shared.audit.verify import audit_site_ledger
from shared.distributed_dp import compose
from shared.identity import load_private_key, provision_simulation
from shared.ledger import RUN_LEDGER_FILE, SiteLedger
from shared.model import build_model, get_trainable
from shared.records import record_from_arrays
from shared.secagg.settings import SecAggSettings
from shared.site import site_from_node_config
from tests.test_secagg_flower import InProcessGrid, task_identity  # noqa: F401  (the fixture is autouse)

RUN_ID = 9191
SITES = 3


@pytest.fixture()
def cfg(tiny_config):  # type: ignore[no-untyped-def]
    return replace(
        tiny_config,
        secure_aggregation=True,
        dp_noise="distributed",
        local_steps=1,
        optimizer="sgd",
        noise_multiplier=1.0,
        target_epsilon=0.0,
        num_server_rounds=2,
    )


def _contexts(cfg, node_config: dict[str, Any] | None = None) -> dict[int, Context]:  # type: ignore[no-untyped-def]
    return {
        1000 + i: Context(
            run_id=RUN_ID,
            node_id=1000 + i,
            node_config={"partition-id": i, "num-partitions": SITES, **(node_config or {})},
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )
        for i in range(SITES)
    }


def _simulate(cfg, node_config: dict[str, Any] | None = None) -> tuple[dict, dict[int, Context]]:  # type: ignore[no-untyped-def]
    import server.app as server_app

    app = ClientApp(mods=[secagg_mod])
    app.train()(client_app.train)
    contexts = _contexts(cfg, node_config)
    server_context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    server_app.app(InProcessGrid(app, contexts), server_context)
    return json.loads((cfg.run_dir(str(RUN_ID)) / "metrics.json").read_text()), contexts


def _ledgers(cfg, contexts: dict[int, Context]) -> list[SiteLedger]:  # type: ignore[no-untyped-def]
    sim_dir = cfg.simulation_dir(RUN_ID)
    sites = [site_from_node_config(c.node_config, sim_dir=sim_dir) for c in contexts.values()]
    return [SiteLedger(s.ledger_path, site_id=s.site_id) for s in sites]


def test_a_distributed_run_trains_and_every_site_records_both_guarantees(cfg) -> None:  # type: ignore[no-untyped-def]
    metrics, contexts = _simulate(cfg)
    trained = [r for r in metrics["rounds"] if r["round"] >= 1]
    assert [r["dp_noise"] for r in trained] == ["distributed", "distributed"]
    assert not any(r["aborted"] for r in trained) and all(len(r["survivors"]) == SITES for r in trained)
    assert metrics["config"]["dp-noise"] == "distributed"
    run_ledger = (cfg.run_dir(str(RUN_ID)) / RUN_LEDGER_FILE).read_text().splitlines()
    recorded = [json.loads(line) for line in run_ledger if '"round"' in line]
    assert [r.get("dp_noise") for r in recorded if r["round"] >= 1] == ["distributed", "distributed"]
    for ledger in _ledgers(cfg, contexts):
        entries = [e for e in ledger.entries() if e.guarantees is not None]
        assert len(entries) == 2
        g = entries[-1].guarantees
        assert g is not None and g.enforced == "fallback" and entries[-1].event == g.fallback
        assert g.aggregate.shares == SITES and g.fallback.shares == 1
        assert g.aggregate.noise_stddev == pytest.approx(g.fallback.noise_stddev * np.sqrt(SITES))
        # the recorded epsilon is the composition of the fallback history (centering query + 2 rounds)
        history = ledger.history_under("default", "fallback")
        assert entries[-1].epsilon == pytest.approx(compose(history, delta=entries[-1].delta, accountant="prv"))
        aggregate = compose(ledger.history_under("default", "aggregate"), delta=entries[-1].delta, accountant="prv")
        assert aggregate < entries[-1].epsilon


def test_the_audit_recomputes_both_guarantees_and_explains_them(cfg) -> None:  # type: ignore[no-untyped-def]
    from shared.audit.report import site_section

    _, contexts = _simulate(cfg, {"budget-guarantee": "aggregate"})
    ledger = _ledgers(cfg, contexts)[0]
    last = ledger.entries()[-1]
    assert last.guarantees is not None and last.event == last.guarantees.aggregate  # the site opted in
    site = site_from_node_config(contexts[1000].node_config, sim_dir=cfg.simulation_dir(RUN_ID))
    key = load_private_key(site.identity_key_path).public_key()
    audit = audit_site_ledger(ledger.path, site_id=site.site_id, public_key=key, cross_check=True)
    assert audit.ok, audit.findings
    source = audit.sources["default"]
    assert source.distributed_rounds == 2
    assert source.epsilon == pytest.approx(source.epsilon_aggregate)  # enforced on the aggregate guarantee
    assert source.epsilon_fallback is not None and source.epsilon_fallback > source.epsilon_aggregate  # type: ignore[operator]
    from shared.audit.report import guarantee_statements

    statements = guarantee_statements([site_section(audit)], [])
    assert any("aggregate guarantee" in s and "fallback guarantee" in s for s in statements)


def test_a_plain_train_message_is_declined_in_distributed_mode(cfg) -> None:  # type: ignore[no-untyped-def]
    provision_simulation(cfg.simulation_dir(RUN_ID), SITES)
    context = next(iter(_contexts(cfg).values()))
    arrays = get_trainable(build_model(cfg, 2))
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(arrays),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: str(RUN_ID)}),
        }
    )
    reply = client_app.app(Message(content, dst_node_id=1000, message_type="train"), context)
    reason = str(reply.content.config_records[C.DECLINE_RECORD]["reason"])
    assert "did not come through secure aggregation's masked-input stage" in reason
    assert C.UPDATE_RECORD not in reply.content.array_records


def test_a_secure_round_without_noise_in_its_parameters_is_declined(cfg) -> None:  # type: ignore[no-untyped-def]
    provision_simulation(cfg.simulation_dir(RUN_ID), SITES)
    app = ClientApp(mods=[secagg_mod])
    app.train()(client_app.train)
    contexts = _contexts(cfg)
    arrays = get_trainable(build_model(cfg, 2))
    dim = int(sum(a.size for a in arrays.values()))
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(arrays),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: 1, C.KEY_RUN_ID: str(RUN_ID)}),
        }
    )
    agg = aggregate_secure(
        InProcessGrid(app, contexts),
        node_ids=sorted(contexts),
        content=content,
        server_round=1,
        run_id=str(RUN_ID),
        settings=SecAggSettings(clip_norm=cfg.update_clip_norm, max_clients=SITES, dim=dim),  # no noise
        timeout_s=60.0,
    )
    assert agg.total is None
    assert len(agg.declined) == SITES
    assert all("carries no distributed noise" in r for r in agg.decline_reasons.values())


def test_the_update_sent_is_the_clipped_gradient_sum_over_the_public_batch(cfg) -> None:  # type: ignore[no-untyped-def]
    from client.distributed_round import update_from_step

    delta = np.ones(4)
    # 50 rows at batch-size 8: 7 Poisson batches, Opacus's mean is over int(50 / 7) = 7 rows, the public over 8
    out = update_from_step(delta, num_rows=50, sample_rate=1 / 7, batch_size=8)
    assert np.allclose(out, 7 / 8)


def test_the_audit_report_renders_a_distributed_ledger(cfg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from shared.audit.report import build_report, render_html

    _, contexts = _simulate(cfg)
    site = site_from_node_config(contexts[1001].node_config, sim_dir=cfg.simulation_dir(RUN_ID))
    key = load_private_key(site.identity_key_path).public_key()
    audit = audit_site_ledger(site.ledger_path, site_id=site.site_id, public_key=key)
    report = build_report(sites=[audit], runs=[], findings=audit.findings)
    rows = [p for p in report["sites"][0]["dp_parameters"] if "mechanism" in p]
    assert len(rows) == 1 and rows[0]["rounds"] == 2 and rows[0]["noise_multiplier"] < 1.0  # fallback: z / sqrt(3)
    html = render_html(report)
    assert "the aggregate guarantee" in html and "the fallback guarantee" in html


def test_a_simulated_site_takes_its_distributed_policy_from_its_site_toml(cfg) -> None:  # type: ignore[no-untyped-def]
    from client.distributed_round import site_distributed_policy

    provision_simulation(cfg.simulation_dir(RUN_ID), SITES)
    context = _contexts(cfg)[1000]
    site = site_from_node_config(context.node_config, sim_dir=cfg.simulation_dir(RUN_ID))
    (site.site_dir / "site.toml").write_text('min-survivors = 5\nbudget-guarantee = "aggregate"\n')
    policy = site_distributed_policy(context, site)
    assert (policy.min_survivors, policy.budget_guarantee) == (5, "aggregate")
