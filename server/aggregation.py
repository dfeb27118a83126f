"""Plain (non-secure) fixed-weight aggregation: the server sums the clients' updates in the clear.

Only for comparison and debugging: every individual update is visible to the server. Secure aggregation
(``server/secagg_workflow.py``) returns the same :class:`RoundAggregate` while seeing only masked vectors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.optimizer import ServerOptimizer
from server.round_result import RoundAggregate
from shared import constants as C
from shared.config import RunConfig
from shared.identity import Roster
from shared.updates import mean_from_sum

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("privatune.server")

INSECURE_WARNING = (
    "SECURE AGGREGATION IS OFF: the server sees every site's individual update in the clear, and only each "
    "site's own DP noise protects its data. Run so only where secure aggregation cannot run (a federation of "
    "two sites, whose sum would reveal the other's update anyway) or to compare against it."
)


def send_to_nodes(
    grid: Grid, requests: Mapping[int, Message], *, timeout: float, what: str
) -> tuple[dict[int, Message], list[int]]:
    """Send one message per node; the replies by node, and the nodes without one (sorted).

    The grid stamps each message's id as it pushes it, and a reply names the message it answers: replies are
    mapped by that, not by sender, because the error the SuperLink itself returns for a node that went offline
    comes from the SuperLink's own node id. Error replies are kept (the caller drops their node).
    """
    received = list(grid.send_and_receive(list(requests.values()), timeout=timeout))
    sent_to = {m.metadata.message_id: nid for nid, m in requests.items()}
    replies: dict[int, Message] = {}
    for reply in received:
        nid = sent_to.get(reply.metadata.reply_to_message_id)
        sender = reply.metadata.src_node_id
        if nid is None or nid in replies or (sender != nid and not reply.has_error()):
            logger.warning("%s: unexpected or duplicate reply from node %s (for node %s) ignored", what, sender, nid)
        else:
            replies[nid] = reply
    missing = sorted(set(requests) - set(replies))
    if missing:
        logger.info("%s: no reply from %d node(s) within %.0fs: %s", what, len(missing), timeout, missing)
    return replies, missing


def read_reply_records(node: int, reply: Message, result: RoundAggregate) -> bool:
    """File ``node``'s reply's clear-text records (metrics, DP event, attestation, decline) into ``result``.

    Returns True when the reply carries an update to aggregate, False for an error or a decline.
    """
    if reply.has_error():
        logger.warning("node %s failed: %s", node, reply.error.reason)
        result.dropped.append(node)
        return False
    content = reply.content
    if C.DECLINE_RECORD in content.config_records:
        reason = str(content.config_records[C.DECLINE_RECORD].get("reason", ""))
        result.declined.append(node)
        result.decline_reasons[node] = reason
        logger.info("node %s declined: %s", node, reason)
        return False
    metrics = content.metric_records.get(C.METRICS_RECORD)
    if metrics is not None:
        result.client_metrics[node] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
    event = content.config_records.get(C.DP_EVENT_RECORD)
    if event is not None:
        result.dp_events[node] = dict(event)
        if "site-id" in event:
            result.site_ids[node] = str(event["site-id"])
    attestation = content.config_records.get(C.ATTESTATION_RECORD)
    if attestation is not None:
        result.attestations[node] = dict(attestation)
    return True


def aggregate_plain(
    grid: Grid,
    *,
    node_ids: list[int],
    content: RecordDict,
    update_clip_norm: float,
    dim: int,
    timeout_s: float,
) -> RoundAggregate:
    """Send the train request to ``node_ids`` and sum the (clipped, weight-1) updates that come back."""
    requests = {n: Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in node_ids}
    replies, missing = send_to_nodes(grid, requests, timeout=timeout_s, what="train")
    result = RoundAggregate(total=None, total_weight=0.0)
    result.dropped.extend(missing)
    total = np.zeros(dim, dtype=np.float64)
    for node, reply in sorted(replies.items()):
        if not read_reply_records(node, reply, result):
            continue
        problem = _check_update(reply.content, dim=dim, bound=update_clip_norm)
        if problem is not None:
            logger.warning("node %s sent an invalid update (%s); treated as dropped", node, problem)
            result.dropped.append(node)
            continue
        total += reply.content.array_records[C.UPDATE_RECORD][C.UPDATE_ARRAY].numpy().astype(np.float64)
        result.survivors.append(node)
        result.total_weight += 1.0
    result.total = total if result.survivors else None
    return result


def _check_update(content: RecordDict, *, dim: int, bound: float) -> str | None:
    record: Any = content.array_records.get(C.UPDATE_RECORD)
    if record is None or C.UPDATE_ARRAY not in record:
        return f"no ArrayRecord {C.UPDATE_RECORD!r} with {C.UPDATE_ARRAY!r}"
    vec = record[C.UPDATE_ARRAY].numpy()
    if vec.shape != (dim,):
        return f"shape {vec.shape}, expected ({dim},)"
    if not np.all(np.isfinite(vec)):
        return "non-finite values"
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if norm > bound * (1 + 1e-4):
        return f"L2 norm {norm:.4g} over update-clip-norm {bound:g}"
    return None


def aggregate(
    grid: Grid,
    cfg: RunConfig,
    *,
    node_ids: list[int],
    content: RecordDict,
    server_round: int,
    run_id: str,
    dim: int,
    roster: Roster | None,
    clip_norm: float | None = None,
) -> RoundAggregate:
    """One round's sum of the sampled sites' updates (``dim`` values, each clipped to ``clip_norm``, by default
    ``update-clip-norm``): securely (the server learns only the sum) unless ``secure-aggregation = false``."""
    bound = cfg.update_clip_norm if clip_norm is None else clip_norm
    if cfg.secure_aggregation:
        from server.secagg_workflow import aggregate_secure, settings_from_config

        return aggregate_secure(
            grid,
            node_ids=node_ids,
            content=content,
            server_round=server_round,
            run_id=run_id,
            settings=settings_from_config(
                cfg, num_clients=len(node_ids), dim=dim, clip_norm=bound, distributed_noise=clip_norm is None
            ),
            timeout_s=cfg.secagg_timeout * 4,  # the stage that includes local training
            roster=roster,
        )
    return aggregate_plain(
        grid,
        node_ids=node_ids,
        content=content,
        update_clip_norm=bound,
        dim=dim,
        timeout_s=cfg.secagg_timeout * 4,
    )


def apply_update(
    agg: RoundAggregate, global_arrays: OrderedDict[str, np.ndarray], server_opt: ServerOptimizer, model: nn.Module
) -> OrderedDict[str, np.ndarray]:
    """The new global tensors: the server optimizer's step from the sites' mean update, set into ``model``; the
    old ones when the round yielded no sum (aborted, or no site contributed)."""
    if agg.total is None or agg.total_weight <= 0:
        return global_arrays
    from shared.model import flatten, set_trainable, unflatten

    mean = mean_from_sum(agg.total, agg.total_weight)
    updated = unflatten(flatten(global_arrays) + server_opt.step(mean), global_arrays)
    set_trainable(model, updated)
    return updated
