"""Secure aggregation on the Message API: the server side of one SecAgg+ round, over a Flower ``Grid``.

Five exchanges of "train" messages, each carrying a ``ConfigRecord`` under ``secagg`` (see
``shared/secagg/constants.py``): advertise-keys, share-keys, masked-input (which also carries the usual train
content, so the client's mod runs local training inside it), consistency-check (the survivors sign the
survivor set) and unmask. Each exchange has a timeout; a node
that does not answer in time, answers with an error, or answers with a malformed record is dropped from the
round. The protocol logic is :class:`shared.secagg.server.SecAggServer`; this module only moves records, and
hands each masked vector straight to it (the server never sees one client's unmasked update).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.aggregation import read_reply_records, send_to_nodes
from server.round_result import RoundAggregate
from shared.distributed_dp import MODE_DISTRIBUTED, MODE_LOCAL, record_sensitivity
from shared.identity import Roster
from shared.secagg import constants as K
from shared.secagg.errors import SecAggAbort, SecAggError
from shared.secagg.messages import (
    EncryptedShares,
    KeyAdvert,
    RoundParams,
    SurvivorSignature,
    UnmaskShares,
    masked_input_reply_node,
)
from shared.secagg.server import SecAggServer
from shared.secagg.settings import SecAggSettings

logger = logging.getLogger("privatune.secagg")


def settings_from_config(
    cfg: Any, *, num_clients: int, dim: int, clip_norm: float | None = None, distributed_noise: bool = True
) -> SecAggSettings:
    """Secure-aggregation settings from the run config (``shared.config.RunConfig``) for one round.

    ``max_clients`` is the round's sample size, which gives the finest fixed-point scale that cannot wrap.
    ``dim`` is the update length every masked input must have, ``clip_norm`` its L2 bound (default
    ``update-clip-norm``; the centering query's vectors are bounded by ``center-clip-norm``). With
    ``dp-noise = "distributed"`` and ``distributed_noise`` (a training round, not the centering query), the
    round parameters carry the aggregate noise every site adds a share of (docs/distributed-dp.md).
    """
    noise: dict[str, Any] = {}
    if distributed_noise and getattr(cfg, "dp_noise", MODE_LOCAL) == MODE_DISTRIBUTED:
        noise = {
            "noise_multiplier": float(cfg.noise_multiplier),
            "sensitivity": record_sensitivity(
                learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size
            ),
            "min_survivors": int(cfg.dp_min_survivors),
        }
    return SecAggSettings(
        **noise,
        clip_norm=float(cfg.update_clip_norm if clip_norm is None else clip_norm),
        max_clients=max(2, num_clients),
        degree=int(cfg.secagg_degree) or None,
        threshold=int(cfg.secagg_threshold) or None,
        stage_timeout_s=float(cfg.secagg_timeout),
        on_abort=cfg.secagg_on_abort,
        dim=dim,
    )


def _exchange(
    grid: Grid, requests: Mapping[int, RecordDict], *, server_round: int, timeout: float, stage: str
) -> dict[int, Message]:
    """Send one stage's requests; the replies that came back in time and without an error, by node."""
    messages = {
        nid: Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(server_round))
        for nid, content in requests.items()
    }
    replies, _ = send_to_nodes(grid, messages, timeout=timeout, what=f"secagg {stage}")
    for nid, reply in sorted(replies.items()):
        if reply.has_error():
            logger.warning("secagg %s: node %s dropped: %s", stage, nid, reply.error.reason)
            del replies[nid]
    return replies


def _stage_records(replies: Mapping[int, Message], stage: str) -> dict[int, dict[str, Any]]:
    """Each reply's secagg record as a dict (replies without one are dropped)."""
    out = {}
    for nid, reply in replies.items():
        record = reply.content.config_records.get(K.SECAGG_RECORD)
        if record is None:
            logger.warning("secagg %s: node %s replied without a %r record; dropped", stage, nid, K.SECAGG_RECORD)
            continue
        out[nid] = dict(record)
    return out


def _parse(records: Mapping[int, dict[str, Any]], parse: Any, stage: str) -> dict[int, Any]:
    out = {}
    for nid, cfg in records.items():
        try:
            out[nid] = parse(cfg)
        except SecAggError as e:
            logger.warning("secagg %s: node %s sent a malformed record (%s); dropped", stage, nid, e)
    return out


def _config_content(cfg: Mapping[str, Any]) -> RecordDict:
    return RecordDict({K.SECAGG_RECORD: ConfigRecord(dict(cfg))})


def aggregate_secure(
    grid: Grid,
    *,
    node_ids: list[int],
    content: RecordDict,
    server_round: int,
    run_id: str,
    settings: SecAggSettings,
    timeout_s: float,
    roster: Roster | None = None,
    weights: Mapping[int, float] | None = None,
) -> RoundAggregate:
    """One secure round: the decoded SUM of the survivors' updates, and who survived, dropped, declined.

    ``content`` is what a plain train message would carry (global ArrayRecord + train config); it rides on the
    masked-input stage, whose timeout is ``timeout_s`` (it includes local training). The other stages use
    ``settings.stage_timeout_s``. With ``roster``, the server checks the signature of every advertised key
    and learns each node's site id from it. An aborted round returns ``aborted=True`` and no total;
    ``settings.on_abort`` is for the caller to act on.
    """
    result = RoundAggregate(total=None, total_weight=0.0)
    if len(set(node_ids)) < 2:  # a "sum" of one update is that update
        result.aborted = True
        result.abort_reason = f"secure aggregation needs at least 2 sampled sites, got {len(set(node_ids))}"
        logger.warning("secagg round %d ABORTED, nothing sent: %s", server_round, result.abort_reason)
        return result
    params = RoundParams.for_round(settings, run_id=run_id, server_round=server_round, node_ids=node_ids)
    server = SecAggServer(params, roster=roster)
    quick = settings.stage_timeout_s
    try:
        # 1. advertise keys
        setup = _config_content(params.to_config())
        replies = _exchange(grid, dict.fromkeys(node_ids, setup), server_round=server_round, timeout=quick,
                            stage=K.STAGE_ADVERTISE_KEYS)  # fmt: skip
        server.receive_adverts(_parse(_stage_records(replies, K.STAGE_ADVERTISE_KEYS), KeyAdvert.from_config,
                                      K.STAGE_ADVERTISE_KEYS))  # fmt: skip
        result.site_ids.update(server.site_ids())

        # 2. share keys
        requests = {n: _config_content(r.to_config()) for n, r in server.share_keys_requests().items()}
        replies = _exchange(grid, requests, server_round=server_round, timeout=quick, stage=K.STAGE_SHARE_KEYS)
        server.receive_encrypted_shares(
            _parse(_stage_records(replies, K.STAGE_SHARE_KEYS), EncryptedShares.from_config, K.STAGE_SHARE_KEYS)
        )

        # 3. masked input: the train content plus this node's relayed shares; local training runs inside
        requests = {
            n: RecordDict({**dict(content.items()), K.SECAGG_RECORD: ConfigRecord(r.to_config())})
            for n, r in server.masked_input_requests(weights).items()
        }
        replies = _exchange(grid, requests, server_round=server_round, timeout=timeout_s, stage=K.STAGE_MASKED_INPUT)
        for nid, reply in sorted(replies.items()):
            _collect_masked_input(server, result, nid, reply, dim=settings.dim)

        # 4. consistency check: every survivor signs the one survivor set the server will unmask
        requests = {n: _config_content(r.to_config()) for n, r in server.consistency_requests().items()}
        replies = _exchange(grid, requests, server_round=server_round, timeout=quick, stage=K.STAGE_CONSISTENCY_CHECK)
        server.receive_signatures(
            _parse(_stage_records(replies, K.STAGE_CONSISTENCY_CHECK), SurvivorSignature.from_config,
                   K.STAGE_CONSISTENCY_CHECK)
        )  # fmt: skip

        # 5. unmask: the signed set and the signatures; each client checks the quorum before revealing
        requests = {n: _config_content(r.to_config()) for n, r in server.unmask_requests().items()}
        replies = _exchange(grid, requests, server_round=server_round, timeout=quick, stage=K.STAGE_UNMASK)
        server.receive_unmask_shares(
            _parse(_stage_records(replies, K.STAGE_UNMASK), UnmaskShares.from_config, K.STAGE_UNMASK)
        )
        summed = server.result()
    except SecAggAbort as e:
        result.aborted, result.abort_reason = True, str(e)
        result.total, result.total_weight = None, 0.0
        result.survivors = []  # nobody's update is used
        result.declined = list(server.declined)
        result.dropped = list(server.dropped)  # those that really left; the others' inputs were discarded
        logger.warning("secagg round %d ABORTED, nothing revealed: %s", server_round, e)
        return result
    result.total = summed.total
    result.total_weight = summed.total_weight
    result.survivors = list(summed.survivors)
    result.dropped = list(summed.dropped)
    result.declined = list(summed.declined)
    logger.info(
        "secagg round %d: %d survivors, %d dropped, %d declined (k = %d, t = %d, resolution %.1e)%s",
        server_round, len(result.survivors), len(result.dropped), len(result.declined), params.degree,
        params.threshold, summed.resolution,
        "" if params.noise_sizing is None else
        f", distributed DP noise std {params.dp_noise_stddev / params.dp_scale:.3g} in {params.dp_shares} shares",
    )  # fmt: skip
    return result


def _collect_masked_input(
    server: SecAggServer, result: RoundAggregate, nid: int, reply: Message, *, dim: int | None
) -> None:
    """File a masked-input reply: its clear-text records into ``result``, its masked vector into the sum."""
    scratch = RoundAggregate(total=None, total_weight=0.0)
    if not read_reply_records(nid, reply, scratch):  # a decline (errors were filtered out before)
        server.mark_declined(nid)
        result.decline_reasons.update(scratch.decline_reasons)
        return
    try:
        record = reply.content.array_records.get(K.MASKED_RECORD)
        if record is None or K.MASKED_ARRAY not in record:
            raise SecAggError(f"no ArrayRecord {K.MASKED_RECORD!r} with {K.MASKED_ARRAY!r}")
        if masked_input_reply_node(dict(reply.content.config_records[K.SECAGG_RECORD])) != nid:
            raise SecAggError("the reply names another node")
        if dim is not None and tuple(record[K.MASKED_ARRAY].shape) != (dim,):
            raise SecAggError(f"masked vector of shape {record[K.MASKED_ARRAY].shape}, expected ({dim},)")
        server.add_masked_input(nid, np.asarray(record[K.MASKED_ARRAY].numpy()))
    except (SecAggError, KeyError) as e:
        logger.warning("secagg %s: node %s sent no valid masked input (%s); dropped", K.STAGE_MASKED_INPUT, nid, e)
        return
    result.client_metrics.update(scratch.client_metrics)
    result.dp_events.update(scratch.dp_events)
    result.attestations.update(scratch.attestations)
    for node, site in scratch.site_ids.items():
        result.site_ids.setdefault(node, site)
