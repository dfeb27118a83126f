"""One secure-aggregation round driven in a single process: for the tests and the benchmark.

Every message goes through ``to_config`` / ``from_config``, as it would through a Flower ``ConfigRecord``;
the masked vector is passed as the array it would be in an ``ArrayRecord``. Dropouts are simulated per stage:
a node listed under a stage does not reply to that stage (and is gone from then on). A stage's list may be a
function of the server, called when the stage starts (the neighbour graph is only known after the adverts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.identity import (
    IDENTITY_KEY_FILE,
    Roster,
    load_private_key,
    provision_simulation,
    site_id_for_partition,
)
from shared.secagg import constants as K
from shared.secagg.client import SecAggClient
from shared.secagg.errors import SecAggProtocolError
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
    config_size,
    masked_input_reply_config,
)
from shared.secagg.server import SecAggServer
from shared.secagg.settings import ClientPolicy

ARRAY_HEADER_BYTES = 128  # a .npy header, as Flower's Array serialises a vector


@dataclass
class Meter:
    """Seconds spent and bytes sent, per client and by the server."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    uploaded: dict[int, int] = field(default_factory=dict)
    downloaded: dict[int, int] = field(default_factory=dict)

    def client(self, nid: int, seconds: float, up: int, down: int) -> None:
        self.client_seconds[nid] = self.client_seconds.get(nid, 0.0) + seconds
        self.uploaded[nid] = self.uploaded.get(nid, 0) + up
        self.downloaded[nid] = self.downloaded.get(nid, 0) + down


def _advertise(c: SecAggClient, req: dict[str, Any]) -> dict[str, Any]:
    return c.advertise_keys(RoundParams.from_config(req)).to_config()


def _share(c: SecAggClient, req: dict[str, Any]) -> dict[str, Any]:
    return c.share_keys(ShareKeysRequest.from_config(req)).to_config()


def _decline(c: SecAggClient, req: dict[str, Any]) -> dict[str, Any]:
    c.receive_shares(MaskedInputRequest.from_config(req))
    c.decline()
    return {K.KEY_STAGE: K.STAGE_MASKED_INPUT}


def _sign(c: SecAggClient, req: dict[str, Any]) -> dict[str, Any]:
    return c.sign_survivors(ConsistencyRequest.from_config(req)).to_config()


def _unmask(c: SecAggClient, req: dict[str, Any]) -> dict[str, Any]:
    return c.unmask(UnmaskRequest.from_config(req)).to_config()


def run_round(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    update_for: Callable[[int], np.ndarray],
    *,
    drop: Mapping[str, Collection[int] | Callable[[SecAggServer], Collection[int]]] | None = None,
    decline: Collection[int] = (),
    weights: Mapping[int, float] | None = None,
    meter: Meter | None = None,
    refusals: dict[int, str] | None = None,
) -> None:
    """Run every stage; raises :class:`SecAggAbort` if the round aborts. ``server.result()`` has the sum.

    ``refusals`` collects the clients that refused a stage (protocol error) and why; they count as dropped.
    """
    drop = drop or {}
    meter = meter if meter is not None else Meter()
    refusals = refusals if refusals is not None else {}
    gone: set[int] = set()

    def answering(stage: str, targets: Collection[int]) -> list[int]:
        leaving = drop.get(stage, ())
        gone.update(leaving(server) if callable(leaving) else leaving)
        return [n for n in sorted(targets) if n not in gone]

    def call(
        nid: int, fn: Callable[[SecAggClient, dict[str, Any]], dict[str, Any]], req: dict[str, Any]
    ) -> dict[str, Any] | None:
        start = time.perf_counter()
        try:
            reply = fn(clients[nid], req)
        except SecAggProtocolError as e:
            refusals[nid] = str(e)
            gone.add(nid)
            return None
        meter.client(nid, time.perf_counter() - start, config_size(reply), config_size(req))
        return reply

    clock = time.perf_counter

    # Stage 1: advertise keys
    setup = server.advertise_request().to_config()
    adverts = {}
    for nid in answering(K.STAGE_ADVERTISE_KEYS, server.params.node_ids):
        if (reply := call(nid, _advertise, setup)) is not None:
            adverts[nid] = KeyAdvert.from_config(reply)
    start = clock()
    server.receive_adverts(adverts)
    requests = {n: r.to_config() for n, r in server.share_keys_requests().items()}
    meter.server_seconds += clock() - start

    # Stage 2: share keys
    shares = {}
    for nid in answering(K.STAGE_SHARE_KEYS, requests):
        if (reply := call(nid, _share, requests[nid])) is not None:
            shares[nid] = EncryptedShares.from_config(reply)
    start = clock()
    server.receive_encrypted_shares(shares)
    requests = {n: r.to_config() for n, r in server.masked_input_requests(weights).items()}
    meter.server_seconds += clock() - start

    # Stage 3: masked input (or a decline)
    for nid in answering(K.STAGE_MASKED_INPUT, requests):
        if nid in decline:
            if call(nid, _decline, requests[nid]) is not None:
                server.mark_declined(nid)
            continue
        update = update_for(nid)  # local training: not part of the protocol's cost
        start = clock()
        try:
            clients[nid].receive_shares(MaskedInputRequest.from_config(requests[nid]))
            masked = clients[nid].mask_input(update)
        except SecAggProtocolError as e:
            refusals[nid] = str(e)
            gone.add(nid)
            continue
        reply_cfg = masked_input_reply_config(nid)
        up = config_size(reply_cfg) + 4 * masked.size + ARRAY_HEADER_BYTES
        meter.client(nid, clock() - start, up, config_size(requests[nid]))
        start = clock()
        server.add_masked_input(nid, masked)
        meter.server_seconds += clock() - start
        del masked
    start = clock()
    requests = {n: r.to_config() for n, r in server.consistency_requests().items()}
    meter.server_seconds += clock() - start

    # Stage 4: consistency check
    signatures = {}
    for nid in answering(K.STAGE_CONSISTENCY_CHECK, requests):
        if (reply := call(nid, _sign, requests[nid])) is not None:
            signatures[nid] = SurvivorSignature.from_config(reply)
    start = clock()
    server.receive_signatures(signatures)
    requests = {n: r.to_config() for n, r in server.unmask_requests().items()}
    meter.server_seconds += clock() - start

    # Stage 5: unmask
    unmask = {}
    for nid in answering(K.STAGE_UNMASK, requests):
        if (reply := call(nid, _unmask, requests[nid])) is not None:
            unmask[nid] = UnmaskShares.from_config(reply)
    start = clock()
    server.receive_unmask_shares(unmask)
    meter.server_seconds += clock() - start


def make_clients(
    sim_dir: Path, node_ids: Sequence[int], *, policy: ClientPolicy | None = None
) -> tuple[dict[int, SecAggClient], Roster]:
    """Provision one simulated site per node (``site-<i>`` for the i-th node id) and its protocol client."""
    roster = provision_simulation(sim_dir, len(node_ids))
    clients = {}
    for i, nid in enumerate(node_ids):
        site = site_id_for_partition(i)
        key = load_private_key(Path(sim_dir) / "sites" / site / IDENTITY_KEY_FILE)
        clients[nid] = SecAggClient(node_id=nid, site_id=site, identity_key=key, roster=roster, policy=policy)
    return clients, roster
