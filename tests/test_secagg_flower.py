"""The Flower integration: ``aggregate_secure`` over a Grid and ``secagg_mod`` in a ClientApp.

The Grid is an in-process double: it serialises every message to protobuf and back (as the SuperLink
would), dispatches it to the ClientApp with that node's persistent Context, and can drop nodes at a stage
(silently, or with the error reply the SuperLink itself sends for a node that went offline) or let a test
tamper with a request on the way (an active server).
"""

from __future__ import annotations

import ast
import inspect
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import server.secagg_workflow as workflow
from client.secagg_mod import make_secagg_mod, requires_secagg
from server.secagg_workflow import aggregate_secure, settings_from_config
from shared import constants as C
from shared.identity import provision_simulation
from shared.secagg import constants as K
from shared.secagg.settings import SecAggSettings
from shared.site import SiteConfigError, site_from_node_config

DIM = 257
Tamper = Callable[[Message], None]


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    """A ServerApp process sets these before it creates messages; so does this test."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 77, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _copy(msg: Message) -> Message:
    """The message as the other side gets it: through protobuf, with its message id (a fresh one if unset)."""
    if not msg.metadata.message_id:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a Grid stamps what it pushes
    out = message_from_proto(message_to_proto(msg))
    out.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return out


class InProcessGrid(Grid):
    """Dispatches each message to ``app`` with the destination node's Context; no network, no threads."""

    def __init__(
        self,
        app: ClientApp,
        contexts: dict[int, Context],
        *,
        drop: dict[str, set[int]] | None = None,
        offline: dict[str, set[int]] | None = None,
        fail: dict[str, set[int]] | None = None,
        tamper: Tamper | None = None,
    ) -> None:
        self.app, self.contexts = app, contexts
        self.drop, self.offline, self.fail, self.tamper = drop or {}, offline or {}, fail or {}, tamper
        self.gone: set[int] = set()
        self.unreachable: set[int] = set()
        self.timeouts: list[float | None] = []
        self.errors: dict[int, str] = {}

    def set_run(self, run: object) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self) -> object:  # type: ignore[override]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the in-process grid only does send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the in-process grid only does send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            record = msg.content.config_records.get(K.SECAGG_RECORD)
            if record is not None:
                self.gone |= self.drop.get(str(record[K.KEY_STAGE]), set())
                self.unreachable |= self.offline.get(str(record[K.KEY_STAGE]), set())
                failing = self.fail.get(str(record[K.KEY_STAGE]), set())
            else:
                failing = set()
            if nid in self.gone:
                continue  # no reply within the timeout
            delivered = _copy(msg)
            if nid in self.unreachable:
                # what the SuperLink answers for a node that stopped polling: an error from the SuperLink's own
                # node id, in reply to the message
                replies.append(create_message_error_unavailable_res_message(delivered.metadata, "node_unavail"))
                continue
            if nid in failing:  # the ClientApp raised: its SuperNode replies with an error
                replies.append(_copy(Message(Error(code=2, reason="boom"), reply_to=delivered)))
                continue
            if self.tamper is not None:
                self.tamper(delivered)
            reply = self.app(delivered, self.contexts[nid])
            if reply.has_error():
                self.errors[nid] = reply.error.reason
            replies.append(_copy(reply))
        return replies


def make_app(sim_dir: Path, updates: dict[int, np.ndarray], *, decline: frozenset[int] = frozenset()) -> ClientApp:
    app = ClientApp(mods=[make_secagg_mod(lambda ctx: site_from_node_config(ctx.node_config, sim_dir=sim_dir))])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        assert K.SECAGG_RECORD not in msg.content, "the mod must strip its record before training"
        assert C.GLOBAL_RECORD in msg.content.array_records
        nid = context.node_id
        if nid in decline:
            return Message(RecordDict({C.DECLINE_RECORD: ConfigRecord({"reason": "budget spent"})}), reply_to=msg)
        return Message(
            RecordDict(
                {
                    C.UPDATE_RECORD: ArrayRecord({C.UPDATE_ARRAY: Array(updates[nid])}),
                    C.METRICS_RECORD: MetricRecord({C.METRIC_TRAIN_LOSS: 0.5, C.METRIC_EPSILON: 1.25}),
                    C.DP_EVENT_RECORD: ConfigRecord({"steps": 4, "site-id": f"site-{sorted(updates).index(nid)}"}),
                }
            ),
            reply_to=msg,
        )

    return app


def federation(
    tmp_path: Path, n: int, *, seed: int = 0, node_config: dict | None = None
) -> tuple[dict[int, Context], dict[int, np.ndarray]]:
    provision_simulation(tmp_path, n)
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in sorted(rng.integers(1, 2**63, size=n))]
    contexts = {
        nid: Context(
            run_id=77,
            node_id=nid,
            node_config={"partition-id": i, "num-partitions": n, **(node_config or {})},
            state=RecordDict(),
            run_config={},
        )
        for i, nid in enumerate(ids)
    }
    updates = {}
    for nid in ids:
        u = rng.normal(size=DIM)
        updates[nid] = (u / np.linalg.norm(u) * rng.uniform(0.2, 0.9)).astype(np.float32)
    return contexts, updates


def train_content(server_round: int = 1) -> RecordDict:
    return RecordDict(
        {
            C.GLOBAL_RECORD: ArrayRecord({"w": Array(np.zeros(DIM, np.float32))}),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: "77"}),
        }
    )


SETTINGS = SecAggSettings(clip_norm=1.0, max_clients=10, stage_timeout_s=5.0, dim=DIM)


def run(grid: InProcessGrid, server_round: int = 1, settings: SecAggSettings = SETTINGS, **kw: object):  # type: ignore[no-untyped-def]
    return aggregate_secure(
        grid,
        node_ids=sorted(grid.contexts),
        content=train_content(server_round),
        server_round=server_round,
        run_id="77",
        settings=settings,
        timeout_s=30.0,
        **kw,  # type: ignore[arg-type]
    )


def plain(updates: dict[int, np.ndarray], nodes: list[int]) -> np.ndarray:
    return np.sum([updates[n].astype(np.float64) for n in nodes], axis=0)


def test_secure_round_returns_the_plain_sum_and_the_clear_records(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 5)
    roster = provision_simulation(tmp_path, 5)
    agg = run(InProcessGrid(make_app(tmp_path, updates), contexts), roster=roster)
    assert not agg.aborted and agg.survivors == sorted(updates) and agg.dropped == [] and agg.declined == []
    assert agg.total is not None and agg.total.dtype == np.float64
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 5 * 2.0**-27
    assert agg.total_weight == 5.0
    assert agg.client_metrics[agg.survivors[0]][C.METRIC_EPSILON] == 1.25
    assert agg.dp_events[agg.survivors[0]]["steps"] == 4
    assert agg.site_ids == {nid: f"site-{i}" for i, nid in enumerate(sorted(updates))}


def test_two_rounds_in_a_row_reuse_the_node_state(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 4)
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    assert not run(grid, server_round=1).aborted
    agg = run(grid, server_round=2)
    assert not agg.aborted and agg.survivors == sorted(updates)


def test_a_replayed_round_is_refused_by_every_site(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 4)
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    run(grid, server_round=3)
    agg = run(grid, server_round=3)
    assert agg.aborted and agg.total is None
    assert all("is not after the last round it set up" in reason for reason in grid.errors.values())


# With 6 sites (complete graph, t = 4, quorum 4) a client needs t neighbours' shares (1 dropout at the first
# two stages), t survivors in its neighbourhood and q survivors or signatures (2 at the later stages)
TOLERATED = {K.STAGE_ADVERTISE_KEYS: 1, K.STAGE_SHARE_KEYS: 1, K.STAGE_MASKED_INPUT: 2,
             K.STAGE_CONSISTENCY_CHECK: 2, K.STAGE_UNMASK: 2}  # fmt: skip


@pytest.mark.parametrize("stage", K.STAGES)
def test_dropouts_up_to_each_stages_tolerance_still_give_the_sum(tmp_path: Path, stage: str) -> None:
    contexts, updates = federation(tmp_path, 6)
    gone = set(sorted(updates)[1::3][: TOLERATED[stage]])
    agg = run(InProcessGrid(make_app(tmp_path, updates), contexts, drop={stage: gone}))
    assert not agg.aborted, agg.abort_reason
    late = stage in (K.STAGE_CONSISTENCY_CHECK, K.STAGE_UNMASK)  # their inputs are already in the sum
    expected = sorted(updates) if late else sorted(set(updates) - gone)
    assert agg.survivors == expected and agg.dropped == sorted(set(updates) - set(expected))
    assert np.max(np.abs(agg.total - plain(updates, expected))) <= len(expected) * 2.0**-27


def test_a_declining_site_is_reported_declined_and_left_out(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 5)
    decliner = sorted(updates)[0]
    agg = run(InProcessGrid(make_app(tmp_path, updates, decline=frozenset({decliner})), contexts))
    assert agg.declined == [decliner] and agg.decline_reasons == {decliner: "budget spent"}
    assert decliner not in agg.survivors and decliner not in agg.dropped
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 4 * 2.0**-27
    assert decliner not in agg.client_metrics


def test_too_many_dropouts_abort_and_reveal_nothing(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 6)
    gone = set(sorted(updates)[:3])
    agg = run(InProcessGrid(make_app(tmp_path, updates), contexts, drop={K.STAGE_MASKED_INPUT: gone}))
    assert agg.aborted and agg.total is None and agg.total_weight == 0.0 and agg.survivors == []
    assert agg.dropped == sorted(gone)
    assert "only 3 masked inputs arrived, below threshold 4" in (agg.abort_reason or "")
    for nid in set(updates) - gone:  # no site was asked for a share
        assert contexts[nid].state.config_records[K.CLIENT_STATE_RECORD]["phase"] == "masked"


def test_an_update_over_the_clip_bound_is_refused_and_dropped(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 5)
    cheat = sorted(updates)[2]
    updates[cheat] = updates[cheat] * 10
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    agg = run(grid)
    assert cheat in agg.dropped and cheat not in agg.survivors
    assert "exceeds clip_norm * weight = 1; clip before masking" in grid.errors[cheat]
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 4 * 2.0**-27


def test_a_key_swapped_by_the_server_is_detected_through_flower(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 6)
    victim = sorted(updates)[0]

    def swap(msg: Message) -> None:
        record = msg.content.config_records.get(K.SECAGG_RECORD)
        if msg.metadata.dst_node_id == victim and record is not None and record[K.KEY_STAGE] == K.STAGE_SHARE_KEYS:
            keys = list(record[K.KEY_ADVERT_MASK_KEYS])  # type: ignore[arg-type]
            other = list(record[K.KEY_ADVERT_NODE_IDS]).index(sorted(updates)[1])  # type: ignore[arg-type]
            keys[other] = bytes(32 * [9])
            record[K.KEY_ADVERT_MASK_KEYS] = keys

    grid = InProcessGrid(make_app(tmp_path, updates), contexts, tamper=swap)
    agg = run(grid)
    assert "are not signed by that site" in grid.errors[victim]
    assert victim in agg.dropped and not agg.aborted
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 5 * 2.0**-27


def test_a_single_sampled_site_is_never_aggregated_securely(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 2)
    only = sorted(updates)[0]
    grid = InProcessGrid(make_app(tmp_path, updates), {only: contexts[only]})
    agg = run(grid)
    assert agg.aborted and agg.total is None and grid.timeouts == []
    assert agg.abort_reason == "secure aggregation needs at least 2 sampled sites, got 1"


def test_each_stage_has_its_timeout(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 3)
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    run(grid)
    assert grid.timeouts == [5.0, 5.0, 30.0, 5.0, 5.0]


def test_a_plain_train_message_passes_through_the_mod(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 2)
    nid = sorted(updates)[0]
    msg = _copy(Message(train_content(), dst_node_id=nid, message_type="train"))
    reply = make_app(tmp_path, updates)(msg, contexts[nid])
    assert np.array_equal(reply.content.array_records[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy(), updates[nid])
    assert K.CLIENT_STATE_RECORD not in contexts[nid].state.config_records


def test_a_site_requiring_secagg_refuses_a_plain_train_message(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 2, node_config={K.NODE_REQUIRE_SECAGG: True})
    nid = sorted(updates)[0]
    msg = _copy(Message(train_content(), dst_node_id=nid, message_type="train"))
    reply = make_app(tmp_path, updates)(msg, contexts[nid])
    assert reply.has_error()
    assert "requires secure aggregation (require-secagg = true" in reply.error.reason


def test_require_secagg_must_be_a_boolean() -> None:
    with pytest.raises(SiteConfigError, match="node config 'require-secagg' must be true or false, got 'maybe'"):
        requires_secagg({K.NODE_REQUIRE_SECAGG: "maybe"})
    assert requires_secagg({K.NODE_REQUIRE_SECAGG: "true"}) and not requires_secagg({})


def test_a_stage_message_out_of_order_gets_an_error_reply(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 2)
    nid = sorted(updates)[0]
    record = ConfigRecord({K.KEY_STAGE: K.STAGE_UNMASK, K.KEY_RUN_ID: "77", K.KEY_SERVER_ROUND: 1,
                           K.KEY_SURVIVORS: [nid], K.KEY_DROPPED: [], K.KEY_SIGNER_IDS: [],
                           K.KEY_SIGNATURES: []})  # fmt: skip
    msg = _copy(Message(RecordDict({K.SECAGG_RECORD: record}), dst_node_id=nid, message_type="train"))
    reply = make_app(tmp_path, updates)(msg, contexts[nid])
    assert reply.has_error() and "no secagg round in progress" in reply.error.reason


def test_settings_come_from_the_run_config() -> None:
    from shared.config import RunConfig

    cfg = RunConfig()
    s = settings_from_config(cfg, num_clients=7, dim=100)
    assert (s.clip_norm, s.max_clients, s.degree, s.threshold, s.dim) == (
        cfg.update_clip_norm,
        7,
        None,
        None,
        100,
    )
    assert (s.stage_timeout_s, s.on_abort) == (cfg.secagg_timeout, cfg.secagg_on_abort)


def test_the_workflow_hands_every_received_vector_straight_to_the_sum() -> None:
    tree = ast.parse(inspect.getsource(workflow))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    numpy_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(".numpy")]
    assert numpy_calls, "the workflow must read the masked vector somewhere"
    for call in numpy_calls:
        node: ast.AST = call
        while not (isinstance(node, ast.Call) and ast.unparse(node.func) == "server.add_masked_input"):
            assert node in parents, f"{ast.unparse(call)} is used outside server.add_masked_input"
            node = parents[node]
            assert not isinstance(node, (ast.Assign, ast.stmt)), f"{ast.unparse(call)} is stored: {ast.unparse(node)}"
    decodes = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and "decode" in ast.unparse(n.func)]
    assert decodes == [], "only SecAggServer decodes, and only the total"


@pytest.mark.parametrize("how", ["error", "offline"])
def test_an_error_reply_is_a_dropout_of_that_node_not_a_crash(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ClientApp that raises replies with an error from its node; for a node that stopped polling, the
    SuperLink itself replies, from its own node id. Either way the node is dropped, and the log names it."""
    contexts, updates = federation(tmp_path, 5)
    broken = sorted(updates)[4]
    grid = InProcessGrid(
        make_app(tmp_path, updates),
        contexts,
        **{"fail" if how == "error" else "offline": {K.STAGE_MASKED_INPUT: {broken}}},
    )
    agg = run(grid)
    assert broken in agg.dropped and len(agg.survivors) == 4 and not agg.aborted
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 4 * 2.0**-27
    dropped = [r.getMessage() for r in caplog.records if f"node {broken} dropped" in r.getMessage()]
    assert dropped and ("boom" in dropped[0] if how == "error" else "unavailable" in dropped[0].lower()), caplog.text
    assert "unexpected" not in caplog.text


def _simulate(cfg, num_sites: int) -> dict:  # type: ignore[no-untyped-def]
    """The project's ServerApp and ClientApp train handler, secure-aggregation mod in front, over the grid."""
    import json

    import torch

    import client.app as client_app
    import server.app as server_app
    from client.secagg_mod import secagg_mod

    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # The handler seeds its data order and DP noise, but dropout draws from torch's global RNG: pin it
        # too, so that the secure and the plain run train on identical updates ("same seeds").
        server_round = int(msg.content.config_records[C.TRAIN_CONFIG_RECORD][C.KEY_SERVER_ROUND])  # type: ignore[arg-type]
        torch.manual_seed(context.node_id * 1000 + server_round)
        return client_app.train(msg, context)

    run_id = 9090
    contexts = {
        1000 + i: Context(
            run_id=run_id,
            node_id=1000 + i,
            node_config={"partition-id": i, "num-partitions": num_sites},
            state=RecordDict(),
            run_config=cfg.to_flower(),
        )
        for i in range(num_sites)
    }
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    server_app.app(InProcessGrid(app, contexts), server_context)
    return json.loads((cfg.run_dir(str(run_id)) / "metrics.json").read_text())


@pytest.mark.slow
def test_the_simulation_learns_the_same_with_secure_and_plain_aggregation(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    runs = {}
    for secure in (True, False):
        # same seeds: DP noise and Poisson sampling seeded from the run seed (never the default: see reproducible-noise)
        cfg = replace(
            tiny_config,
            secure_aggregation=secure,
            reproducible_noise=True,
            output_dir=str(tmp_path / f"secure-{secure}"),
        )
        runs[secure] = _simulate(cfg, num_sites=3)
    for r_secure, r_plain in zip(runs[True]["rounds"], runs[False]["rounds"], strict=True):
        assert r_secure["secure_aggregation"] and not r_plain["secure_aggregation"]
        assert not r_secure["aborted"] and r_secure["survivors"] == r_plain["survivors"]
        # identical updates; the aggregates differ by the fixed-point rounding only (< 1e-8 per coordinate)
        assert r_secure["test"]["accuracy"] == r_plain["test"]["accuracy"]
        assert abs(r_secure["test"]["loss"] - r_plain["test"]["loss"]) <= 1e-6


def test_plain_aggregation_drops_an_offline_node_by_its_own_id(tmp_path: Path) -> None:
    """The same SuperLink error reply on the plain path: the node is dropped, the SuperLink's id is not."""
    from server.aggregation import aggregate_plain

    contexts, updates = federation(tmp_path, 4)
    offline = sorted(updates)[1]

    class Once(InProcessGrid):  # the plain request has no secagg stage: the node is offline from the start
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            self.unreachable = {offline}
            return super().send_and_receive(messages, timeout=timeout)

    agg = aggregate_plain(
        Once(make_app(tmp_path, updates), contexts),
        node_ids=sorted(contexts),
        content=train_content(),
        update_clip_norm=1.0,
        dim=DIM,
        timeout_s=30.0,
    )
    assert agg.dropped == [offline] and agg.survivors == sorted(set(updates) - {offline})
    assert np.max(np.abs(agg.total - plain(updates, agg.survivors))) <= 1e-6


def test_a_round_whose_run_id_is_not_the_flower_run_is_refused(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 4)
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    agg = aggregate_secure(grid, node_ids=sorted(contexts), content=train_content(), server_round=1,
                           run_id="another-run", settings=SETTINGS, timeout_s=30.0)  # fmt: skip
    assert agg.aborted and agg.total is None
    assert all("run id 'another-run' is not this Flower run's id '77'" in r for r in grid.errors.values())
    assert len(grid.errors) == 4


def test_a_train_config_of_another_round_is_refused_at_the_masked_input(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 4)
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    agg = aggregate_secure(grid, node_ids=sorted(contexts), content=train_content(server_round=5), server_round=1,
                           run_id="77", settings=SETTINGS, timeout_s=30.0)  # fmt: skip
    assert agg.aborted and agg.total is None
    assert all("the train config's round 5 is not the secure-aggregation round 1" in r for r in grid.errors.values())
    assert len(grid.errors) == 4
    for nid in contexts:  # nobody trained or masked
        assert contexts[nid].state.config_records[K.CLIENT_STATE_RECORD]["phase"] == "shared"


def test_a_site_with_a_larger_minimum_cohort_refuses_a_smaller_round(tmp_path: Path) -> None:
    contexts, updates = federation(tmp_path, 4, node_config={K.NODE_MIN_COHORT: 5})
    grid = InProcessGrid(make_app(tmp_path, updates), contexts)
    agg = run(grid)
    assert agg.aborted and agg.total is None
    assert all("below this site's minimum cohort of 5" in r for r in grid.errors.values()) and len(grid.errors) == 4
