"""A malicious server attacks one site's update (issue 10, item 1), end to end through the real mod.

Twelve sites, default degree k = 8 and threshold t = 6, real ``SecAggClient`` state machines behind the real
``client/secagg_mod.py``, real Flower ``Message`` objects serialised through protobuf. The adversarial server
is written here. The attack of the issue: relay to the target T the encrypted shares of only t - 1 of its
neighbours P_T, so T masks with those only; tell T and P_T that everyone survived, so they reveal T's
self-mask seed shares, and tell every other holder that as many members of P_T dropped as keep it at >= t
alive, so they reveal those members' mask-key shares. Before the fix the server recovered T's exact update
(max error one fixed-point unit; commit "tests/test_secagg_attack.py: issue 10 item 1 reproduced").

Now: T refuses to mask with fewer than t neighbours' shares; with t of them, the different survivor sets
shown to different clients never gather the quorum of signatures a client needs before it reveals a share,
and no single survivor set lets the server alone rebuild both T's seed and its pairwise keys. The last tests
pin the fewest colluding sites the analysis (``shared/secagg/analysis.py``) says the server needs, by
running the attack that works with that many and failing with one fewer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from shared import constants as C
from shared.identity import IDENTITY_KEY_FILE, load_private_key
from shared.secagg import constants as K
from shared.secagg import masks, shamir
from shared.secagg.analysis import exposure
from shared.secagg.client import SecAggClient
from shared.secagg.crypto import sign, x25519_public
from shared.secagg.encoding import FixedPoint
from shared.secagg.errors import SecAggProtocolError
from shared.secagg.inprocess import make_clients
from shared.secagg.messages import (
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInputRequest,
    RoundParams,
    ShareKeysRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    survivor_set_payload,
)
from shared.secagg.settings import SecAggSettings, consistency_quorum
from tests.test_secagg_flower import _copy, federation, make_app

N_SITES = 12


class Adversary:
    """A server that talks to the real ClientApp of each node, one message at a time, and keeps everything."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.contexts, self.updates = federation(tmp_path, n)
        self.app = make_app(tmp_path, self.updates)
        self.ids = sorted(self.contexts)
        self.errors: dict[int, str] = {}  # each node's last refusal
        self.reasons: list[str] = []  # every refusal

    def send(self, nid: int, cfg: dict[str, Any], *, with_train: bool = False, server_round: int = 1) -> Message:
        content = RecordDict({K.SECAGG_RECORD: ConfigRecord(cfg)})
        if with_train:
            content[C.GLOBAL_RECORD] = _train_global()
            content[C.TRAIN_CONFIG_RECORD] = ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: "77"})
        msg = _copy(Message(content, dst_node_id=nid, message_type="train", group_id=str(server_round)))
        reply = _copy(self.app(msg, self.contexts[nid]))
        if reply.has_error():
            self.errors[nid] = reply.error.reason
            self.reasons.append(reply.error.reason)
        return reply


def _train_global():  # type: ignore[no-untyped-def]
    from flwr.app import Array, ArrayRecord

    from tests.test_secagg_flower import DIM

    return ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})


def _max_flow_assignment(
    holders: dict[int, tuple[int, set[int]]], demand: dict[int, int]
) -> dict[int, set[int]] | None:
    """Which owners each holder is told dropped: holder h -> at most cap_h of its owners; every owner v gets
    demand[v] holders. ``holders[h] = (cap_h, owners h holds a share of)``. Bipartite b-matching by augmenting
    paths; None if the demand cannot be met."""
    assign: dict[int, set[int]] = {h: set() for h in holders}
    covered: dict[int, set[int]] = {v: set() for v in demand}

    def augment(v: int, seen: set[int]) -> bool:
        for h, (cap, owners) in holders.items():
            if v not in owners or h in covered[v] or h in seen:
                continue
            seen.add(h)
            if len(assign[h]) < cap:
                assign[h].add(v)
                covered[v].add(h)
                return True
            for w in sorted(assign[h]):  # move one of h's owners w to another holder
                if w != v and h in covered[w]:
                    assign[h].discard(w)
                    covered[w].discard(h)
                    if augment(w, seen):
                        assign[h].add(v)
                        covered[v].add(h)
                        return True
                    assign[h].add(w)
                    covered[w].add(h)
        return False

    for v, need in demand.items():
        for _ in range(need):
            if not augment(v, set()):
                return None
    return assign


def _plan(
    graph: dict[int, frozenset[int]], target: int, t: int, size: int
) -> tuple[tuple[int, ...], dict[int, set[int]]]:
    """A set P_T of ``size`` neighbours of T and, per holder, the members of P_T it is told dropped."""
    for peers in itertools.combinations(sorted(graph[target]), size):
        p_t = set(peers)
        holders = {}
        for h in graph:
            if h == target:
                continue  # T must see everyone alive: its book is P_T + itself, exactly t
            book = graph[h] | {h}
            holders[h] = (len(book) - t, (graph[h] & p_t) - {h})  # keep >= t of its book alive
        assignment = _max_flow_assignment(holders, dict.fromkeys(peers, t))
        if assignment is not None:
            return peers, assignment
    raise AssertionError("no plan")


def _record(reply: Message) -> dict[str, Any]:
    return dict(reply.content.config_records[K.SECAGG_RECORD])


def _setup(adv: Adversary) -> tuple[RoundParams, dict[int, KeyAdvert], dict[int, frozenset[int]], dict[int, Any]]:
    """Stages 1 and 2 as the protocol demands (every advert relayed to everyone): nothing to gain there."""
    settings = SecAggSettings(clip_norm=1.0, max_clients=len(adv.ids))
    params = RoundParams.for_round(settings, run_id="77", server_round=1, node_ids=adv.ids)
    adverts = {n: KeyAdvert.from_config(_record(adv.send(n, params.to_config()))) for n in adv.ids}
    graph = params.neighbours(adv.ids, params.advert_digest(adverts.values()))
    everyone = ShareKeysRequest(run_id="77", server_round=1, adverts=tuple(adverts[v] for v in adv.ids))
    shares = {n: EncryptedShares.from_config(_record(adv.send(n, everyone.to_config()))) for n in adv.ids}
    return params, adverts, graph, {n: dict(zip(s.dst_node_ids, s.ciphertexts, strict=True)) for n, s in shares.items()}


def _masked_inputs(
    adv: Adversary, graph: dict[int, frozenset[int]], cts: dict[int, Any], target: int, p_t: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """Stage 3: T gets the shares of P_T only, everybody else all of theirs; the server keeps every vector."""
    masked = {}
    for n in adv.ids:
        srcs = sorted(v for v in graph[n] if v in p_t or n != target)
        req = MaskedInputRequest(run_id="77", server_round=1, src_node_ids=tuple(srcs),
                                 ciphertexts=tuple(cts[v][n] for v in srcs))  # fmt: skip
        reply = adv.send(n, req.to_config(), with_train=True)
        if not reply.has_error():
            masked[n] = reply.content.array_records[K.MASKED_RECORD][K.MASKED_ARRAY].numpy().copy()
    return masked


def test_the_target_refuses_to_mask_with_fewer_than_t_neighbours_shares(tmp_path: Path) -> None:
    adv = Adversary(tmp_path, N_SITES)
    params, _, graph, cts = _setup(adv)
    assert (params.degree, params.threshold) == (8, 6)  # the defaults at n = 12
    target = adv.ids[0]
    p_t, _ = _plan(graph, target, params.threshold, params.threshold - 1)  # the attack: t - 1 peers
    masked = _masked_inputs(adv, graph, cts, target, p_t)
    assert target not in masked  # T sends nothing: there is nothing of it to unmask
    assert adv.errors == {
        target: f"node {target} refuses the secure-aggregation round: node {target}: shares arrived from only 5 "
        "neighbours; this site masks with at least t = 6"
    }


def test_different_survivor_sets_for_different_holders_fail_the_consistency_check(tmp_path: Path) -> None:
    """The issue's attack with the t peers T now demands: each holder is shown the survivor set that makes
    it reveal what the server needs; each signs what it is shown, but no set reaches the quorum."""
    adv = Adversary(tmp_path, N_SITES)
    params, adverts, graph, cts = _setup(adv)
    t, target = params.threshold, adv.ids[0]
    quorum = consistency_quorum(N_SITES, t)
    assert quorum == 8
    p_t = tuple(sorted(graph[target]))[:t]
    masked = _masked_inputs(adv, graph, cts, target, p_t)
    assert sorted(masked) == adv.ids and adv.errors == {}

    # 4. consistency check: T and P_T see everyone alive (they would reveal T's seed shares); every other
    # holder sees as many of P_T dropped as keep it at >= t alive (it would reveal their mask-key shares)
    views: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for n in adv.ids:
        dropped = () if n in (target, *p_t) else tuple(sorted(graph[n] & set(p_t))[: len(graph[n]) + 1 - t])
        views[n] = (tuple(sorted(set(adv.ids) - set(dropped))), dropped)
    signatures: dict[tuple, dict[int, bytes]] = {}
    for n in adv.ids:
        req = ConsistencyRequest(run_id="77", server_round=1, survivors=views[n][0], dropped=views[n][1])
        reply = adv.send(n, req.to_config())
        if not reply.has_error():
            signatures.setdefault(views[n], {})[n] = SurvivorSignature.from_config(_record(reply)).signature
    assert len(signatures) >= 2 and max(len(s) for s in signatures.values()) < quorum  # no set has a quorum

    # 5. unmask: each holder gets its own set with the signatures on it, then with every signature there is
    revealed: list[UnmaskShares] = []
    everything = [(nid, sig) for sigs in signatures.values() for nid, sig in sigs.items()]
    for n in adv.ids:
        if n not in signatures.get(views[n], {}):
            continue
        for relayed in (sorted(signatures[views[n]].items()), everything):
            req = UnmaskRequest(run_id="77", server_round=1, survivors=views[n][0], dropped=views[n][1],
                                signer_ids=tuple(i for i, _ in relayed),
                                signatures=tuple(s for _, s in relayed))  # fmt: skip
            reply = adv.send(n, req.to_config())
            if not reply.has_error():
                revealed.append(UnmaskShares.from_config(_record(reply)))
    assert revealed == []  # not one share of anything
    reasons = adv.reasons
    assert any("valid signatures on the survivor set, below the quorum 8 of 12 nodes" in r for r in reasons)
    assert any("is not its site's signature of this survivor set" in r for r in reasons)
    assert _recover(params, adverts, masked, target, seed_shares=[], pairwise={}) is None


def test_no_single_survivor_set_lets_the_server_alone_unmask_the_target(tmp_path: Path) -> None:
    """One consistent (U, D) with T in U and its t peers P_T in D: the honest sites that would reveal T's
    seed are too few, and the set is below the quorum anyway: nobody signs it."""
    adv = Adversary(tmp_path, N_SITES)
    params, adverts, graph, cts = _setup(adv)
    t, target = params.threshold, adv.ids[0]
    p_t = tuple(sorted(graph[target]))[:t]
    masked = _masked_inputs(adv, graph, cts, target, p_t)
    u_set, d_set = tuple(sorted(set(adv.ids) - set(p_t))), p_t
    req = ConsistencyRequest(run_id="77", server_round=1, survivors=u_set, dropped=d_set)
    signed = [n for n in u_set if not adv.send(n, req.to_config()).has_error()]
    assert signed == []
    assert all("a survivor set of 6 is below the 8 this site needs" in adv.errors[n] for n in u_set)
    # Even if they had all signed, T's seed needs t = 6 shares and only T's 2 other neighbours and T are in U
    assert len((graph[target] | {target}) & set(u_set)) == 3 < t
    assert _recover(params, adverts, masked, target, seed_shares=[], pairwise={}) is None


def _recover(
    params: RoundParams,
    adverts: dict[int, KeyAdvert],
    masked: dict[int, np.ndarray],
    target: int,
    *,
    seed_shares: list[shamir.Share],
    pairwise: dict[int, bytes],
    peers: tuple[int, ...] = (),
) -> np.ndarray | None:
    """T's update, if the server holds t seed shares of T and the pairwise key with every peer T masked with
    (``pairwise[v]``: the private mask key of v or of T, as rebuilt or handed over by a colluder)."""
    if len(seed_shares) < params.threshold or any(v not in pairwise for v in peers) or not peers:
        return None
    seed = shamir.combine(seed_shares, threshold=params.threshold)
    y = masked[target].copy()
    masks.apply(y, masks.self_mask(seed, params_digest=params.digest, node_id=target, length=y.size), -1)
    for v in peers:
        stream = masks.pairwise_mask(
            pairwise[v], adverts[target].mask_public_key, params_digest=params.digest, u=target, v=v, length=y.size
        )
        masks.apply(y, stream, -masks.pairwise_sign(target, v))
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=params.max_clients)
    return fp.decode_sum(y, count=1)


# --- the analysis's numbers against the real clients: the attack works with that many colluders, not fewer ---


@dataclass
class Round:
    """An honest round up to the masked inputs, with the server's relays chosen by the test."""

    params: RoundParams
    clients: dict[int, SecAggClient]
    adverts: dict[int, KeyAdvert]
    graph: dict[int, frozenset[int]]
    masked: dict[int, np.ndarray]
    updates: dict[int, np.ndarray]
    identity: dict[int, Ed25519PrivateKey]

    @property
    def ids(self) -> list[int]:
        return sorted(self.clients)


def _round(tmp_path: Path, n: int, peers_of_target: Callable[[dict[int, frozenset[int]]], tuple[int, ...]]) -> Round:
    ids = list(range(101, 101 + n))
    clients, _ = make_clients(tmp_path, ids)
    identity = {
        nid: load_private_key(tmp_path / "sites" / f"site-{i}" / IDENTITY_KEY_FILE) for i, nid in enumerate(ids)
    }
    params = RoundParams.for_round(SecAggSettings(clip_norm=1.0, max_clients=n), run_id="r", server_round=1,
                                   node_ids=ids)  # fmt: skip
    adverts = {nid: c.advertise_keys(params) for nid, c in clients.items()}
    everyone = ShareKeysRequest(run_id="r", server_round=1, adverts=tuple(adverts[v] for v in ids))
    shares = {nid: clients[nid].share_keys(everyone) for nid in ids}
    cts = {nid: dict(zip(s.dst_node_ids, s.ciphertexts, strict=True)) for nid, s in shares.items()}
    graph = params.neighbours(ids, params.advert_digest(adverts.values()))
    target, p_t = ids[0], peers_of_target(graph)
    rng = np.random.default_rng(n)
    updates, masked = {}, {}
    for nid in ids:
        u = rng.normal(size=64)
        updates[nid] = (u / np.linalg.norm(u) * 0.8).astype(np.float32)
        srcs = sorted(p_t if nid == target else graph[nid])
        clients[nid].receive_shares(MaskedInputRequest(run_id="r", server_round=1, src_node_ids=tuple(srcs),
                                                       ciphertexts=tuple(cts[v][nid] for v in srcs)))  # fmt: skip
        masked[nid] = clients[nid].mask_input(updates[nid])
    return Round(params, clients, adverts, graph, masked, updates, identity)


def _collude_and_unmask(
    r: Round, views: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]], colluders: list[int]
) -> tuple[list[shamir.Share], dict[int, list[shamir.Share]], list[str]]:
    """Each view (U, D) is shown to its honest group; honest clients sign it, colluders sign every view;
    each honest client gets its view with all signatures on it. Returns T's seed shares, the key shares of
    every node and the refusals (colluders hand over every share they hold)."""
    target, refusals = r.ids[0], []
    seed_shares: list[shamir.Share] = []
    key_shares: dict[int, list[shamir.Share]] = {v: [] for v in r.ids}
    for (u_set, d_set), group in views.items():
        req = ConsistencyRequest(run_id="r", server_round=1, survivors=u_set, dropped=d_set)
        digest = r.clients[group[0]].state.advert_digest
        payload = survivor_set_payload(params_digest=r.params.digest, advert_digest=digest, survivors=u_set,
                                       dropped=d_set)  # fmt: skip
        sigs = {c: sign(r.identity[c], payload) for c in colluders}
        for h in group:
            try:
                sigs[h] = r.clients[h].sign_survivors(req).signature
            except SecAggProtocolError as e:
                refusals.append(str(e))
        signers = tuple(sorted(sigs))
        unmask = UnmaskRequest(run_id="r", server_round=1, survivors=u_set, dropped=d_set, signer_ids=signers,
                               signatures=tuple(sigs[s] for s in signers))  # fmt: skip
        for h in group:
            try:
                reply = r.clients[h].unmask(unmask)
            except SecAggProtocolError as e:
                refusals.append(str(e))
                continue
            seed_shares += [shamir.Share.from_bytes(b) for o, b in zip(reply.seed_owner_ids, reply.seed_shares,
                                                                       strict=True) if o == target]  # fmt: skip
            for o, b in zip(reply.key_owner_ids, reply.key_shares, strict=True):
                key_shares[o].append(shamir.Share.from_bytes(b))
    for c in colluders:
        state = r.clients[c].state
        held = dict(zip(state.peer_ids, zip(state.peer_seed_shares, state.peer_key_shares, strict=True), strict=True))
        if target in held:
            seed_shares.append(shamir.Share.from_bytes(held[target][0]))
        for o, (_, key) in held.items():
            key_shares[o].append(shamir.Share.from_bytes(key))
    return seed_shares, key_shares, refusals


def _attack_result(r: Round, p_t: tuple[int, ...], colluders: list[int], seed_shares, key_shares):  # type: ignore[no-untyped-def]
    """T's update as the server rebuilds it, or None: a colluder's own key, or a dropped peer's rebuilt key."""
    t = r.params.threshold
    pairwise = {c: r.clients[c].state.mask_private for c in colluders if c in p_t}
    for v in set(p_t) - set(colluders):
        if len(key_shares[v]) >= t:
            key = shamir.combine(key_shares[v][:t], threshold=t)
            if x25519_public(key) == r.adverts[v].mask_public_key:
                pairwise[v] = key
    target = r.ids[0]
    return _recover(r.params, r.adverts, r.masked, target, seed_shares=seed_shares[:t] if len(seed_shares) >= t
                    else seed_shares, pairwise=pairwise, peers=p_t)  # fmt: skip


@pytest.mark.parametrize("num_colluders", [2, 1])
def test_at_n6_two_colluders_and_two_survivor_sets_unmask_a_site_one_cannot(tmp_path: Path, num_colluders: int) -> None:
    """The table's 2 at n = 6 (complete graph, t = q = 4): the quorum path, exactly as the analysis builds it."""
    assert exposure(6).server_with_sites == 2
    r = _round(tmp_path, 6, lambda g: tuple(sorted(g[101])))
    target, colluders = r.ids[0], r.ids[1 : 1 + num_colluders]
    honest = [h for h in r.ids[1:] if h not in colluders]
    group_a, group_b = [target, honest[0]], honest[1:]  # A: T and one peer; B: the other honest peers
    view_a = (tuple(sorted(set(r.ids) - set(group_b))), tuple(sorted(group_b)))  # B's members "dropped"
    view_b = (tuple(sorted(set(r.ids) - {honest[0]})), (honest[0],))  # A's peer "dropped"
    seeds, keys, refusals = _collude_and_unmask(r, {view_a: group_a, view_b: group_b}, colluders)
    recovered = _attack_result(r, tuple(sorted(r.graph[target])), colluders, seeds, keys)
    if num_colluders == 2:
        assert refusals == []
        assert recovered is not None and np.max(np.abs(recovered - r.updates[target])) <= 2.0**-20
    else:
        assert recovered is None
        # T's group cannot gather 4 signatures (nor even a set of 4 survivors): it refuses to sign and reveal
        assert any(f"node {target}: a survivor set of 3 is below the 4 this site needs" in e for e in refusals)
        assert any(f"node {target}: " in e and "stage out of order" in e for e in refusals)


@pytest.mark.parametrize("num_colluders", [4, 3])
def test_at_n12_four_colluders_around_a_site_unmask_it_three_cannot(tmp_path: Path, num_colluders: int) -> None:
    """The table's 4 at n = 12 (k = 8, t = 6, q = 8): one survivor set for all, colluders next to T."""
    assert exposure(12).server_with_sites == 4
    t = 6
    chosen: dict[str, tuple[int, ...]] = {}

    def peers(g: dict[int, frozenset[int]]) -> tuple[int, ...]:  # c colluders and t - c honest peers of T
        ring = sorted(g[101])
        chosen["colluders"] = tuple(ring[:num_colluders])
        return tuple(ring[:t])

    r = _round(tmp_path, 12, peers)
    target, colluders = r.ids[0], list(chosen["colluders"])
    p_t = tuple(sorted(r.graph[target]))[:t]
    dropped = tuple(sorted(set(p_t) - set(colluders)))  # T's honest peers "dropped"
    view = (tuple(sorted(set(r.ids) - set(dropped))), dropped)
    honest = [h for h in view[0] if h not in colluders]
    seeds, keys, refusals = _collude_and_unmask(r, {view: honest}, colluders)
    assert any(f"node {target}: only {num_colluders + 1} of its neighbourhood survived" in e for e in refusals)
    recovered = _attack_result(r, p_t, colluders, seeds, keys)
    if num_colluders == 4:
        assert recovered is not None and np.max(np.abs(recovered - r.updates[target])) <= 2.0**-20
    else:
        assert recovered is None and len(seeds) == t - 1  # T's other 2 neighbours and the 3 colluders
