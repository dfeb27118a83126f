"""The ClientApp's train handler, called as Flower calls it: cumulative epsilon, budgets, replays."""

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

import client.app as client_app
from shared import constants as C
from shared.centering import answer_bound
from shared.identity import provision_simulation
from shared.ledger import SiteLedger
from shared.model import build_model, get_trainable
from shared.privacy import DpEvent, compose_epsilon
from shared.records import MessageError, record_from_arrays
from shared.site import site_from_node_config

RUN_ID = 4242


def _context(cfg, partition_id, num_partitions=3, **node_config):
    return Context(
        run_id=RUN_ID,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions, **node_config},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )


def _train_message(cfg, server_round, arrays=None, task=None):
    arrays = arrays if arrays is not None else get_trainable(build_model(cfg, 2))
    train_config = {C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: str(RUN_ID)}
    if task is not None:
        train_config[C.KEY_TASK] = task
    content = RecordDict(
        {C.GLOBAL_RECORD: record_from_arrays(arrays), C.TRAIN_CONFIG_RECORD: ConfigRecord(train_config)}
    )
    return Message(content, dst_node_id=100, message_type="train")


@pytest.fixture()
def cfg(tiny_config):
    cfg = replace(tiny_config, num_server_rounds=3, local_steps=2)
    provision_simulation(cfg.simulation_dir(RUN_ID), 3)
    return cfg


def test_reported_epsilon_after_r_rounds_is_the_composition_of_all_r_rounds(cfg):
    context = _context(cfg, 0)
    epsilons, events = [], []
    for server_round in (1, 2, 3):
        reply = client_app.app(_train_message(cfg, server_round), context)
        assert not reply.has_error(), reply.error
        epsilons.append(reply.content.metric_records[C.METRICS_RECORD][C.METRIC_EPSILON])
        events.append(DpEvent.from_dict({k: v for k, v in reply.content[C.DP_EVENT_RECORD].items() if k != "site-id"}))
    assert epsilons[0] < epsilons[1] < epsilons[2]
    (event,) = set(events)
    # one accountant that saw all 3 rounds' steps in a row (what one long-lived PrivacyEngine would say)
    prv = PRVAccountant()
    prv.history = [(event.noise_multiplier, event.sample_rate, 3 * event.steps)]
    assert epsilons[2] == pytest.approx(prv.get_epsilon(delta=cfg.delta, eps_error=1e-3), rel=1e-3)
    # the noise was calibrated so that num-server-rounds rounds reach target-epsilon
    assert epsilons[2] == pytest.approx(cfg.target_epsilon, rel=0.02)
    # and epsilon after round 1 is not the per-round value repeated (the Flower-example bug)
    prv1 = PRVAccountant()
    prv1.history = [(event.noise_multiplier, event.sample_rate, event.steps)]
    assert epsilons[0] == pytest.approx(prv1.get_epsilon(delta=cfg.delta, eps_error=1e-3), rel=1e-3)
    rdp = RDPAccountant()
    rdp.history = [(event.noise_multiplier, event.sample_rate, 3 * event.steps)]
    assert compose_epsilon(events, delta=cfg.delta, accountant="rdp") == pytest.approx(rdp.get_epsilon(cfg.delta))


def test_the_site_ledger_holds_every_round_and_survives_a_restart(cfg):
    for server_round in (1, 2):
        client_app.app(_train_message(cfg, server_round), _context(cfg, 1))  # a fresh Context: a restarted client
    site = site_from_node_config({"partition-id": 1, "num-partitions": 3}, sim_dir=cfg.simulation_dir(RUN_ID))
    entries = SiteLedger(site.ledger_path, site_id=site.site_id).entries()
    assert [e.round for e in entries] == [1, 2]
    assert entries[1].epsilon == pytest.approx(compose_epsilon([entries[0].event, entries[1].event], delta=cfg.delta))


def test_a_replayed_round_is_declined_and_not_counted_twice(cfg):
    context = _context(cfg, 2)
    client_app.app(_train_message(cfg, 1), context)
    reply = client_app.app(_train_message(cfg, 1), context)
    assert "already trained" in reply.content.config_records[C.DECLINE_RECORD]["reason"]
    assert C.UPDATE_RECORD not in reply.content.array_records


def test_a_site_declines_a_round_that_would_exceed_its_own_budget(cfg):
    context = _context(cfg, 0, **{"max-epsilon": 0.5})
    reply = client_app.app(_train_message(cfg, 1), context)
    reason = reply.content.config_records[C.DECLINE_RECORD]["reason"]
    assert "site-0" in reason and "max_epsilon=0.5" in reason
    site = site_from_node_config(dict(context.node_config), sim_dir=cfg.simulation_dir(RUN_ID))
    assert not site.ledger_path.exists() or SiteLedger(site.ledger_path, site_id=site.site_id).entries() == []


def test_the_update_is_the_clipped_difference_of_trainable_tensors(cfg):
    cfg = replace(cfg, update_clip_norm=1e-3)
    provision_simulation(cfg.simulation_dir(RUN_ID), 3)
    reply = client_app.app(_train_message(cfg, 1), _context(cfg, 0))
    update = reply.content.array_records[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy()
    assert update.dtype == np.float32
    assert update.shape == (sum(a.size for a in get_trainable(build_model(cfg, 2)).values()),)
    assert np.linalg.norm(update) == pytest.approx(1e-3, rel=1e-4)


def test_a_non_private_round_is_recorded_as_infinite_epsilon(cfg):
    cfg = replace(cfg, dp=False)
    reply = client_app.app(_train_message(cfg, 1), _context(cfg, 0))
    assert reply.content.metric_records[C.METRICS_RECORD][C.METRIC_EPSILON] == -1.0  # -1 encodes inf
    event = reply.content.config_records[C.DP_EVENT_RECORD]
    assert event["noise_multiplier"] == 0.0


def test_a_train_message_without_the_round_number_is_a_clear_error(cfg):
    msg = Message(RecordDict({C.GLOBAL_RECORD: record_from_arrays({})}), dst_node_id=100, message_type="train")
    with pytest.raises(MessageError, match="message has no ConfigRecord 'train-config'"):
        client_app.app(msg, _context(cfg, 0))


def _evaluate_message(cfg, server_round=1):
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.EVALUATE_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round}),
        }
    )
    return Message(content, dst_node_id=100, message_type="evaluate")


def test_evaluate_is_refused_unless_the_site_opts_in(cfg):
    reply = client_app.evaluate(_evaluate_message(cfg), _context(cfg, 0))

    assert "does not set allow-evaluate = true" in reply.content[C.DECLINE_RECORD]["reason"]
    assert C.METRICS_RECORD not in reply.content.metric_records


def _allow_evaluate(cfg, partition_id=0, **settings):
    from shared.site import write_site_settings

    write_site_settings(
        cfg.simulation_dir(RUN_ID) / "sites" / f"site-{partition_id}", {"allow-evaluate": True, **settings}
    )


def test_evaluate_releases_only_noisy_counts_recorded_as_their_own_dp_event(cfg):
    from client.evaluation import evaluation_event

    _allow_evaluate(cfg, **{"evaluate-noise-multiplier": 5.0})
    context = _context(cfg, 0)
    trained = client_app.train(_train_message(cfg, 1), context)

    reply = client_app.evaluate(_evaluate_message(cfg, 1), context)

    metrics = reply.content.metric_records[C.METRICS_RECORD]
    assert set(metrics) == {"confusion-matrix", "accuracy", "num-examples", C.METRIC_EPSILON, C.METRIC_DELTA}
    noisy = np.asarray(metrics["confusion-matrix"])
    assert noisy.shape == (4,) and not np.allclose(noisy, np.round(noisy))  # noise, not exact counts
    site = site_from_node_config(dict(context.node_config), sim_dir=cfg.simulation_dir(RUN_ID))
    entries = SiteLedger(site.ledger_path, site_id=site.site_id).entries()
    assert [(e.round, e.release) for e in entries] == [(1, "train"), (1, "evaluate")]
    assert entries[1].event == evaluation_event(5.0)
    train_event = DpEvent.from_dict({k: v for k, v in trained.content[C.DP_EVENT_RECORD].items() if k != "site-id"})
    assert metrics[C.METRIC_EPSILON] == pytest.approx(
        compose_epsilon([train_event, evaluation_event(5.0)], delta=cfg.delta), rel=1e-6
    )
    replay = client_app.evaluate(_evaluate_message(cfg, 1), context)
    assert "already evaluated by this site (replay)" in replay.content[C.DECLINE_RECORD]["reason"]


def test_evaluate_is_declined_when_it_would_exceed_the_budget(cfg):
    _allow_evaluate(cfg, **{"evaluate-noise-multiplier": 0.5, "max-epsilon": 1.0})

    reply = client_app.evaluate(_evaluate_message(cfg, 1), _context(cfg, 0))

    assert "one round costs epsilon" in reply.content[C.DECLINE_RECORD]["reason"]
    site = site_from_node_config({"partition-id": 0}, sim_dir=cfg.simulation_dir(RUN_ID))
    assert not site.ledger_path.exists() or SiteLedger(site.ledger_path, site_id="site-0").entries() == []


def test_the_centering_query_is_answered_once_in_round_0_recorded_and_budgeted(cfg):
    context = _context(cfg, 0)
    reply = client_app.app(_train_message(cfg, 0, task=C.TASK_FEATURE_MEAN), context)
    assert not reply.has_error(), reply.error
    vector = reply.content.array_records[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy()
    # the noisy sum of the clipped vectors and the noisy count, over a public constant: no division by the count
    assert vector.shape == (build_model(cfg, 2).config.hidden_size + 1,)
    assert np.linalg.norm(vector) <= answer_bound(cfg.center_clip_norm) * (1 + 1e-6)
    query = DpEvent.from_dict({k: v for k, v in reply.content[C.DP_EVENT_RECORD].items() if k != "site-id"})
    assert query == DpEvent(1.0, cfg.center_noise_multiplier, 1, np.sqrt(2.0) * cfg.center_clip_norm)
    assert set(reply.content.metric_records[C.METRICS_RECORD]) <= {C.METRIC_EPSILON, C.METRIC_DELTA}

    epsilons, events = [], []
    for server_round in (1, 2, 3):
        reply = client_app.app(_train_message(cfg, server_round), context)
        epsilons.append(reply.content.metric_records[C.METRICS_RECORD][C.METRIC_EPSILON])
        events.append(DpEvent.from_dict({k: v for k, v in reply.content[C.DP_EVENT_RECORD].items() if k != "site-id"}))
    # every reported epsilon composes the query too, and the noise was calibrated so that query + all rounds
    # reach target-epsilon (not more)
    assert epsilons[0] == pytest.approx(compose_epsilon([query, events[0]], delta=cfg.delta), rel=1e-6)
    assert epsilons[2] == pytest.approx(compose_epsilon([query, *events], delta=cfg.delta), rel=1e-6)
    assert epsilons[2] > compose_epsilon(events, delta=cfg.delta)
    assert cfg.target_epsilon * 0.98 <= epsilons[2] <= cfg.target_epsilon
    site = site_from_node_config(dict(context.node_config), sim_dir=cfg.simulation_dir(RUN_ID))
    entries = SiteLedger(site.ledger_path, site_id=site.site_id).entries()
    assert [e.round for e in entries] == [0, 1, 2, 3] and entries[0].event == query

    again = client_app.app(_train_message(cfg, 0, task=C.TASK_FEATURE_MEAN), context)
    assert "already trained" in again.content.config_records[C.DECLINE_RECORD]["reason"]


@pytest.mark.parametrize("case", ["not round 0", "centering off"])
def test_a_feature_mean_query_outside_a_centered_runs_round_0_is_declined(cfg, case):
    if case == "centering off":
        cfg = replace(cfg, center_features=False)
    reply = client_app.app(
        _train_message(cfg, 0 if case == "centering off" else 2, task=C.TASK_FEATURE_MEAN), _context(cfg, 1)
    )
    assert "only answered in round 0 of a run with center-features = true" in reply.content[C.DECLINE_RECORD]["reason"]


def test_an_unknown_task_is_a_clear_error(cfg):
    with pytest.raises(MessageError, match="unknown task 'steal'"):
        client_app.app(_train_message(cfg, 1, task="steal"), _context(cfg, 0))


def test_the_round_uses_the_center_the_server_sends(cfg):
    from shared.model import get_feature_center

    cfg = replace(cfg, reproducible_noise=True)  # same noise and sampling in every run: only the center differs
    hidden = get_feature_center(build_model(cfg, 2)).shape[0]
    updates = []
    for run_id, center in ((RUN_ID + 1, None), (RUN_ID + 2, None), (RUN_ID + 3, 3.0)):
        provision_simulation(cfg.simulation_dir(run_id), 3)
        msg = _train_message(cfg, 1)
        if center is not None:
            msg.content[C.CENTER_RECORD] = record_from_arrays({C.CENTER_ARRAY: np.full(hidden, center, np.float32)})
        context = Context(
            run_id=run_id,
            node_id=100,
            node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )
        updates.append(client_app.app(msg, context).content.array_records[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy())
    np.testing.assert_array_equal(updates[0], updates[1])
    assert not np.allclose(updates[0], updates[2])


def test_a_dp_round_reply_carries_no_train_loss_and_no_update_norm(cfg):
    """Issue 10 item 6: the exact mean loss of the site's rows, and its update's unclipped norm, left the site in
    the clear, outside secure aggregation and outside any DP event. Under DP the metrics are the ledger's only."""
    reply = client_app.app(_train_message(cfg, 1), _context(cfg, 0))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records[C.METRICS_RECORD]
    assert C.METRIC_TRAIN_LOSS not in metrics and "update-norm" not in metrics
    assert set(metrics) <= {C.METRIC_EPSILON, C.METRIC_DELTA}
    assert set(reply.content.metric_records) == {C.METRICS_RECORD}


def test_a_non_private_round_may_still_report_its_train_loss(cfg):
    cfg = replace(cfg, dp=False)
    metrics = client_app.app(_train_message(cfg, 1), _context(cfg, 0)).content.metric_records[C.METRICS_RECORD]
    assert np.isfinite(metrics[C.METRIC_TRAIN_LOSS]) and "update-norm" not in metrics
