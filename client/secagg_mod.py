"""The client side of secure aggregation as a Flower mod: ``ClientApp(mods=[secagg_mod])``.

A "train" message that carries a ``secagg`` ConfigRecord is a protocol stage and is answered here; the
masked-input stage runs the app's own train handler (``call_next``) on the message without that record, then
replaces the clipped, weighted update in the reply by its masked ``uint32`` encoding, keeping the metrics,
DP-event and attestation records. A reply that declines the round passes through (the site is then counted
as dropped for the masks, and reported as declined). The protocol state between stages lives in
``context.state``; the site's identity key and roster are read from its own files, never from the server.

Any protocol violation (a key not signed by the roster's site, a replay, a stage out of order, an update
over the clip bound, a survivor set without a quorum of signatures) is answered with an error reply: the site
refuses the round and reveals nothing more. The site's own limits come from its node config
(``secagg-min-cohort``, ``secagg-threshold-fraction``, and ``min-survivors`` for distributed DP noise: a
round whose noise relies on fewer survivors, or with fewer survivors at unmasking, is refused before anything
is revealed); the round is bound to the Flower run (the parameters'
run id must be this run's id) and to the train config's round (the masked-input stage's ``server-round``
must be the round whose keys it set up).

Messages without a ``secagg`` record pass through untouched (plain aggregation), unless the node config sets
``require-secagg = true``: then a train message without secure aggregation is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.distributed_round import site_distributed_policy
from shared import constants as C
from shared.distributed_dp import DistributedDpError
from shared.identity import IdentityError, load_private_key, load_site_roster
from shared.secagg import constants as K
from shared.secagg.client import ClientRoundState, SecAggClient
from shared.secagg.encoding import EncodingError
from shared.secagg.errors import SecAggError, SecAggProtocolError
from shared.secagg.messages import (
    ConsistencyRequest,
    MaskedInputRequest,
    RoundParams,
    ShareKeysRequest,
    UnmaskRequest,
    masked_input_reply_config,
    stage_of,
)
from shared.secagg.settings import ClientPolicy
from shared.site import Site, SiteConfigError

logger = logging.getLogger("privatune.secagg")

SiteLoader = Callable[[Context], Site]
_TRUE = {"true", "1", "yes", "on"}


def requires_secagg(node_config: Any) -> bool:
    """Whether the site's own node config demands secure aggregation (``require-secagg``)."""
    value = node_config.get(K.NODE_REQUIRE_SECAGG, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | {"false", "0", "no", "off", ""}:
        return value.strip().lower() in _TRUE
    raise SiteConfigError(f"node config {K.NODE_REQUIRE_SECAGG!r} must be true or false, got {value!r}")


def _default_site(context: Context) -> Site:
    from shared.site import site_from_context

    return site_from_context(context)


def _refuse(msg: Message, reason: str) -> Message:
    logger.warning("secure aggregation: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _load_client(context: Context, site: Site) -> SecAggClient:
    stored = context.state.config_records.get(K.CLIENT_STATE_RECORD)
    return SecAggClient(
        node_id=context.node_id,
        site_id=site.site_id,
        identity_key=load_private_key(site.identity_key_path),
        roster=load_site_roster(site),
        state=ClientRoundState.from_config(dict(stored)) if stored is not None else None,
        policy=ClientPolicy(
            min_cohort=site.secagg_min_cohort,
            threshold_fraction=site.secagg_threshold_fraction,
            min_survivors=site_distributed_policy(context, site).min_survivors,
        ),
    )


def _save(context: Context, client: SecAggClient) -> None:
    if client.state is not None:
        context.state[K.CLIENT_STATE_RECORD] = ConfigRecord(client.state.to_config())


def _reply(msg: Message, cfg: dict[str, Any]) -> Message:
    return Message(RecordDict({K.SECAGG_RECORD: ConfigRecord(cfg)}), reply_to=msg)


def _advertise(context: Context, client: SecAggClient, cfg: dict[str, Any]) -> dict[str, Any]:
    params = RoundParams.from_config(cfg)
    if params.run_id != str(context.run_id):
        raise SecAggProtocolError(
            f"the round's run id {params.run_id!r} is not this Flower run's id {str(context.run_id)!r}"
        )
    return client.advertise_keys(params).to_config()


def _train_round(msg: Message) -> int:
    """The server round the train config names (the masked-input stage must carry the round it set up)."""
    record = msg.content.config_records.get(C.TRAIN_CONFIG_RECORD)
    value = None if record is None else record.get(C.KEY_SERVER_ROUND)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggProtocolError(f"the masked-input stage's train config has no integer {C.KEY_SERVER_ROUND!r}")
    return value


def _masked_input(msg: Message, context: Context, call_next: ClientAppCallable, client: SecAggClient) -> Message:
    train_round = _train_round(msg)
    if client.state is not None and train_round != client.state.params.server_round:
        raise SecAggProtocolError(
            f"the train config's round {train_round} is not the secure-aggregation round "
            f"{client.state.params.server_round} whose keys this site set up"
        )
    client.receive_shares(MaskedInputRequest.from_config(dict(msg.content.config_records[K.SECAGG_RECORD])))
    _save(context, client)  # the shares are kept even if training fails: the server may still ask for them
    del msg.content[K.SECAGG_RECORD]
    # the train handler may rely on the update being masked (distributed DP noise): tell it which round
    context.state[K.MASKING_STATE_RECORD] = ConfigRecord({K.KEY_SERVER_ROUND: train_round})
    try:
        out = call_next(msg, context)
    finally:
        del context.state[K.MASKING_STATE_RECORD]
    if out.has_error():
        return out
    if C.DECLINE_RECORD in out.content.config_records:
        client.decline()
        return out
    record = out.content.array_records.get(C.UPDATE_RECORD)
    if record is None or C.UPDATE_ARRAY not in record:
        raise SecAggError(f"the train reply has neither an ArrayRecord {C.UPDATE_RECORD!r} nor a decline")
    masked = client.mask_input(record[C.UPDATE_ARRAY].numpy())
    content = RecordDict({key: rec for key, rec in out.content.items() if key != C.UPDATE_RECORD})
    content[K.MASKED_RECORD] = ArrayRecord({K.MASKED_ARRAY: Array(masked)})
    content[K.SECAGG_RECORD] = ConfigRecord(masked_input_reply_config(client.node_id))
    return Message(content, reply_to=msg)


def make_secagg_mod(site_loader: SiteLoader = _default_site) -> Mod:
    """The mod, with ``site_loader`` telling it where the site's identity key and roster are."""

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        if K.SECAGG_RECORD not in msg.content.config_records:
            if K.MASKING_STATE_RECORD in context.state.config_records:  # never left over from a failed stage
                del context.state[K.MASKING_STATE_RECORD]
            try:
                required = requires_secagg(context.node_config)
            except SiteConfigError as e:
                return _refuse(msg, str(e))
            if required:
                return _refuse(
                    msg,
                    f"this site requires secure aggregation ({K.NODE_REQUIRE_SECAGG} = true in its node "
                    "config) and refuses to send its update in the clear",
                )
            return call_next(msg, context)
        try:
            cfg = dict(msg.content.config_records[K.SECAGG_RECORD])
            stage = stage_of(cfg)
            client = _load_client(context, site_loader(context))
            if stage == K.STAGE_ADVERTISE_KEYS:
                reply = _reply(msg, _advertise(context, client, cfg))
            elif stage == K.STAGE_SHARE_KEYS:
                reply = _reply(msg, client.share_keys(ShareKeysRequest.from_config(cfg)).to_config())
            elif stage == K.STAGE_MASKED_INPUT:
                reply = _masked_input(msg, context, call_next, client)
            elif stage == K.STAGE_CONSISTENCY_CHECK:
                reply = _reply(msg, client.sign_survivors(ConsistencyRequest.from_config(cfg)).to_config())
            else:
                reply = _reply(msg, client.unmask(UnmaskRequest.from_config(cfg)).to_config())
            _save(context, client)
            return reply
        except (SecAggError, EncodingError, IdentityError, SiteConfigError, DistributedDpError) as e:
            return _refuse(msg, f"node {context.node_id} refuses the secure-aggregation round: {e}")

    return secagg_mod


secagg_mod = make_secagg_mod()
