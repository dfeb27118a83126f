"""A malicious server attacks one site's update (issue 10, item 1), end to end through the real mod.

Twelve sites, default degree k = 8 and threshold t = 6, real ``SecAggClient`` state machines behind the real
``client/secagg_mod.py``, real Flower ``Message`` objects serialised through protobuf. The adversarial server
is written here: it relays to the target T the encrypted shares of only t - 1 of its neighbours P_T, so T
masks with those only; it tells T and P_T that everyone survived, so they reveal T's self-mask seed shares,
and tells every other holder that as many members of P_T dropped as keep it at >= t alive, so they reveal
those members' mask-key shares. No honest site gives both share kinds for one peer, yet the server gets
seed_T and the mask key of every peer T masked with, and strips every mask off T's masked input.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from shared import constants as C
from shared.secagg import constants as K
from shared.secagg import masks, shamir
from shared.secagg.encoding import FixedPoint
from shared.secagg.messages import EncryptedShares, KeyAdvert, RoundParams, UnmaskShares
from shared.secagg.settings import SecAggSettings
from tests.test_secagg_flower import _copy, federation, make_app

N_SITES = 12


class Adversary:
    """A server that talks to the real ClientApp of each node, one message at a time, and keeps everything."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.contexts, self.updates = federation(tmp_path, n)
        self.app = make_app(tmp_path, self.updates)
        self.ids = sorted(self.contexts)
        self.errors: dict[int, str] = {}

    def send(self, nid: int, cfg: dict[str, Any], *, with_train: bool = False, server_round: int = 1) -> Message:
        content = RecordDict({K.SECAGG_RECORD: ConfigRecord(cfg)})
        if with_train:
            content[C.GLOBAL_RECORD] = _train_global()
            content[C.TRAIN_CONFIG_RECORD] = ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: "77"})
        msg = _copy(Message(content, dst_node_id=nid, message_type="train", group_id=str(server_round)))
        reply = _copy(self.app(msg, self.contexts[nid]))
        if reply.has_error():
            self.errors[nid] = reply.error.reason
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


def _plan(graph: dict[int, frozenset[int]], target: int, t: int) -> tuple[tuple[int, ...], dict[int, set[int]]]:
    """A set P_T of t - 1 neighbours of T and, per holder, the members of P_T it is told dropped."""
    for peers in itertools.combinations(sorted(graph[target]), t - 1):
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


def test_the_server_alone_recovers_one_sites_exact_update_with_default_settings(tmp_path: Path) -> None:
    adv = Adversary(tmp_path, N_SITES)
    settings = SecAggSettings(clip_norm=1.0, max_clients=N_SITES)
    params = RoundParams.for_round(settings, run_id="77", server_round=1, node_ids=adv.ids)
    assert (params.degree, params.threshold) == (8, 6)  # the defaults at n = 12
    k, t = params.degree, params.threshold
    graph = params.neighbours()
    target = adv.ids[0]

    # 1. advertise-keys
    adverts = {
        n: KeyAdvert.from_config(dict(adv.send(n, params.to_config()).content[K.SECAGG_RECORD])) for n in adv.ids
    }
    # 2. share-keys: each node gets its neighbours' signed adverts (all honest so far)
    from shared.secagg.messages import ShareKeysRequest

    shares: dict[int, EncryptedShares] = {}
    for n in adv.ids:
        req = ShareKeysRequest(run_id="77", server_round=1, adverts=tuple(adverts[v] for v in sorted(graph[n])))
        shares[n] = EncryptedShares.from_config(dict(adv.send(n, req.to_config()).content[K.SECAGG_RECORD]))
    # 3. masked input: T gets the shares of only t - 1 peers P_T; everybody else gets all of theirs
    p_t, told_dropped = _plan(graph, target, t)
    from shared.secagg.messages import MaskedInputRequest

    masked: dict[int, np.ndarray] = {}
    for n in adv.ids:
        srcs = sorted(v for v in graph[n] if v in p_t or n != target)
        cts = tuple(dict(zip(shares[v].dst_node_ids, shares[v].ciphertexts, strict=True))[n] for v in srcs)
        req = MaskedInputRequest(run_id="77", server_round=1, src_node_ids=tuple(srcs), ciphertexts=cts)
        reply = adv.send(n, req.to_config(), with_train=True)
        masked[n] = reply.content.array_records[K.MASKED_RECORD][K.MASKED_ARRAY].numpy().copy()
    # 4. unmask: T and P_T hear that all survived; every other holder that some of P_T dropped
    from shared.secagg.messages import UnmaskRequest

    seed_shares: list[shamir.Share] = []
    key_shares: dict[int, list[shamir.Share]] = {v: [] for v in p_t}
    for n in adv.ids:
        book = (set(p_t) | {target}) if n == target else graph[n] | {n}
        dropped = told_dropped.get(n, set())
        req = UnmaskRequest(run_id="77", server_round=1, survivors=tuple(sorted(book - dropped)),
                            dropped=tuple(sorted(dropped)))  # fmt: skip
        reply = UnmaskShares.from_config(dict(adv.send(n, req.to_config()).content[K.SECAGG_RECORD]))
        for owner, raw in zip(reply.seed_owner_ids, reply.seed_shares, strict=True):
            if owner == target:
                seed_shares.append(shamir.Share.from_bytes(raw))
        for owner, raw in zip(reply.key_owner_ids, reply.key_shares, strict=True):
            key_shares[owner].append(shamir.Share.from_bytes(raw))
    assert adv.errors == {}  # no honest site noticed anything

    # The server rebuilds seed_T and every pairwise key of T, and strips T's masks
    seed = shamir.combine(seed_shares, threshold=t)
    y = masked[target].copy()
    masks.apply(y, masks.self_mask(seed, params_digest=params.digest, node_id=target, length=y.size), -1)
    for v in p_t:
        c_v = shamir.combine(key_shares[v], threshold=t)
        stream = masks.pairwise_mask(
            c_v, adverts[target].mask_public_key, params_digest=params.digest, u=target, v=v, length=y.size
        )
        masks.apply(y, stream, -masks.pairwise_sign(target, v))
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=N_SITES)
    recovered = fp.decode_sum(y, count=1)
    assert k == 8 and len(p_t) == t - 1
    assert np.max(np.abs(recovered - adv.updates[target])) <= fp.resolution  # T's exact update
