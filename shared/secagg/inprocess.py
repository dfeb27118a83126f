"""One secure-aggregation round driven in a single process: for the tests and the benchmark.

Every message goes through ``to_config`` / ``from_config``, as it would through a Flower ``ConfigRecord``;
the masked vector is passed as the array it would be in an ``ArrayRecord``. Dropouts are simulated per stage:
a node listed under a stage does not reply to that stage (and is gone from then on).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    EncryptedShares,
    KeyAdvert,
    MaskedInputRequest,
    RoundParams,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    config_size,
    masked_input_reply_config,
)
from shared.secagg.server import SecAggServer

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


def run_round(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    update_for: Callable[[int], np.ndarray],
    *,
    drop: Mapping[str, Collection[int]] | None = None,
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
        gone.update(drop.get(stage, ()))
        return [n for n in sorted(targets) if n not in gone]

    def call(nid: int, fn: Callable[[], dict], down: int, extra_up: int = 0) -> dict | None:
        start = time.perf_counter()
        try:
            reply = fn()
        except SecAggProtocolError as e:
            refusals[nid] = str(e)
            gone.add(nid)
            return None
        meter.client(nid, time.perf_counter() - start, config_size(reply) + extra_up, down)
        return reply

    def timed(fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        out = fn()
        meter.server_seconds += time.perf_counter() - start
        return out

    # Stage 1: advertise keys
    setup = server.advertise_request().to_config()
    adverts: dict[int, KeyAdvert] = {}
    for nid in answering(K.STAGE_ADVERTISE_KEYS, server.params.node_ids):
        c = clients[nid]
        reply = call(
            nid, lambda c=c: c.advertise_keys(RoundParams.from_config(setup)).to_config(), config_size(setup)
        )
        if reply is not None:
            adverts[nid] = KeyAdvert.from_config(reply)
    timed(lambda: server.receive_adverts(adverts))

    # Stage 2: share keys
    requests2 = {n: r.to_config() for n, r in timed(server.share_keys_requests).items()}  # type: ignore[attr-defined]
    shares: dict[int, EncryptedShares] = {}
    for nid in answering(K.STAGE_SHARE_KEYS, requests2):
        c, req = clients[nid], requests2[nid]
        reply = call(
            nid,
            lambda c=c, req=req: c.share_keys(ShareKeysRequest.from_config(req)).to_config(),
            config_size(req),
        )
        if reply is not None:
            shares[nid] = EncryptedShares.from_config(reply)
    timed(lambda: server.receive_encrypted_shares(shares))

    # Stage 3: masked input (or a decline)
    requests3 = {n: r.to_config() for n, r in timed(lambda: server.masked_input_requests(weights)).items()}  # type: ignore[attr-defined]
    for nid in answering(K.STAGE_MASKED_INPUT, requests3):
        c, req = clients[nid], requests3[nid]
        if nid in decline:

            def declined(c: SecAggClient = c, req: dict = req) -> dict:
                c.receive_shares(MaskedInputRequest.from_config(req))
                c.decline()
                return {K.KEY_STAGE: K.STAGE_MASKED_INPUT}

            if call(nid, declined, config_size(req)) is not None:
                timed(lambda nid=nid: server.mark_declined(nid))
            continue
        update = update_for(nid)
        holder: list[np.ndarray] = []

        def masked(
            c: SecAggClient = c, req: dict = req, update: np.ndarray = update, holder: list = holder
        ) -> dict:
            c.receive_shares(MaskedInputRequest.from_config(req))
            holder.append(c.mask_input(update))
            return masked_input_reply_config(c.node_id)

        if call(nid, masked, config_size(req), extra_up=4 * update.size + ARRAY_HEADER_BYTES) is not None:
            timed(lambda nid=nid, holder=holder: server.add_masked_input(nid, holder.pop()))

    # Stage 4: unmask
    requests4 = {n: r.to_config() for n, r in timed(server.unmask_requests).items()}  # type: ignore[attr-defined]
    unmask: dict[int, UnmaskShares] = {}
    for nid in answering(K.STAGE_UNMASK, requests4):
        c, req = clients[nid], requests4[nid]
        reply = call(
            nid, lambda c=c, req=req: c.unmask(UnmaskRequest.from_config(req)).to_config(), config_size(req)
        )
        if reply is not None:
            unmask[nid] = UnmaskShares.from_config(reply)
    timed(lambda: server.receive_unmask_shares(unmask))


def make_clients(sim_dir: Path, node_ids: Sequence[int]) -> tuple[dict[int, SecAggClient], Roster]:
    """Provision one simulated site per node (``site-<i>`` for the i-th node id) and its protocol client."""
    roster = provision_simulation(sim_dir, len(node_ids))
    clients = {}
    for i, nid in enumerate(node_ids):
        site = site_id_for_partition(i)
        key = load_private_key(Path(sim_dir) / "sites" / site / IDENTITY_KEY_FILE)
        clients[nid] = SecAggClient(node_id=nid, site_id=site, identity_key=key, roster=roster)
    return clients, roster
