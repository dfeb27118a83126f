"""The ClientApp: a site trains the global adapter on its own rows under DP and returns only its update.

Everything privacy-relevant is decided here, at the site, from the site's own config: its data, its device,
its budget (``max-epsilon``, ``delta``, ``accountant``, ``data-source`` in its node config) and its ledger.
The server's request only says which round it is and carries the global trainable tensors. Every epsilon is
composed at the site's own delta with its own accountant, over every release of its data source.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.budget import decide
from client.release_lock import ReleaseInProgress, exclusive_release
from client.secagg_mod import secagg_mod
from client.site_policy import SitePolicyError, check_site_policy
from shared import constants as C
from shared.config import RunConfig
from shared.distributed_dp import MODE_DISTRIBUTED, AnyDpEvent, DistributedDpError, Guarantees
from shared.identity import load_private_key
from shared.ledger import (
    PURPOSE_EVALUATE,
    PURPOSE_FEATURE_MEAN,
    PURPOSE_TRAIN,
    SiteLedger,
    digest_arrays,
    keyed_fingerprint_rows,
    load_fingerprint_key,
)
from shared.privacy import DpEvent, calibrate_noise_multiplier
from shared.records import MessageError, arrays_from_record, config_value
from shared.site import Site, site_from_context
from shared.updates import clip_to_norm

if TYPE_CHECKING:
    from shared.tasks.base import Rows, Task

# torch, transformers, Opacus and scipy are imported inside the handlers: in a deployment Flower starts one
# ClientApp process per message, and the secure-aggregation stages (3 of a round's 4 messages) need none of them.

logger = logging.getLogger("privatune.client")

# Secure aggregation is a mod around the plain train handler (as Flower's own secaggplus_mod is): it runs the
# key-agreement stages itself and masks the update that ``train`` returns.
app = ClientApp(mods=[secagg_mod])

STATE_RECORD = "privatune-client"


def poisson_sample_rate(num_rows: int, batch_size: int) -> float:
    """The rate Opacus's DPDataLoader uses: 1 / (number of batches of the non-private loader)."""
    return 1.0 / math.ceil(num_rows / min(batch_size, num_rows))


def noise_multiplier_for(
    cfg: RunConfig, sample_rate: float, context: Context, *, delta: float, accountant: str
) -> float:
    """The site's noise multiplier: given directly, or calibrated once per run to reach ``target-epsilon``
    after ``num-server-rounds`` rounds of ``local-steps`` steps at this site's sample rate, together with the
    feature-centering query of a centered run, at the site's own ``delta`` with its own ``accountant``."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    key: dict[str, float | str] = {"sample-rate": sample_rate, "delta": delta, "accountant": accountant}
    state = context.state.config_records.get(STATE_RECORD)
    if state is not None and all(state.get(k) == v for k, v in key.items()):
        return float(state["noise-multiplier"])  # type: ignore[arg-type]
    sigma = calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=cfg.local_steps * cfg.num_server_rounds,
        accountant=accountant,
        prior=(centering_event(cfg),) if cfg.center_features else (),
    )
    context.state[STATE_RECORD] = ConfigRecord({**key, "noise-multiplier": sigma})
    return sigma


def centering_event(cfg: RunConfig) -> DpEvent:
    """The centering query's privacy cost: one Gaussian mechanism on the sum of the site's rows' (clipped vector,
    count) pairs, sample rate 1, sensitivity ``sqrt(2) x center-clip-norm`` (:mod:`shared.centering`)."""
    from shared.centering import query_event

    return query_event(clip_norm=cfg.center_clip_norm, noise_multiplier=cfg.center_noise_multiplier if cfg.dp else 0.0)


def _request_kind(msg: Message) -> str:
    """What the server asks for: a training round (``train``) or round 0's feature-mean query."""
    record = msg.content.config_records.get(C.TRAIN_CONFIG_RECORD)
    kind = C.TASK_TRAIN if record is None else record.get(C.KEY_TASK, C.TASK_TRAIN)
    if kind not in (C.TASK_TRAIN, C.TASK_FEATURE_MEAN):
        raise MessageError(f"ConfigRecord {C.TRAIN_CONFIG_RECORD!r} key {C.KEY_TASK!r}: unknown task {kind!r}")
    return str(kind)


def _decline(msg: Message, reason: str) -> Message:
    logger.warning("declining round: %s", reason)
    return Message(RecordDict({C.DECLINE_RECORD: ConfigRecord({"reason": reason})}), reply_to=msg)


def _open_ledger(site: Site) -> SiteLedger:
    """The site's ledger, checked against its head record and its witness; opened before the site's fingerprint
    key is first made, so that a fingerprint key without a ledger, head or witness means they were deleted."""
    return SiteLedger(
        site.ledger_path,
        site_id=site.site_id,
        signing_key=load_private_key(site.identity_key_path),
        head_path=site.ledger_head_path,
        witness_path=site.witness_path,
        proof_of_use=site.fingerprint_key_path,
    )


def _fingerprint(site: Site, rows: Rows) -> str:
    """The rows' keyed fingerprint (HMAC under the site's own key): it identifies nothing outside the site."""
    return keyed_fingerprint_rows(rows.rows(), key=load_fingerprint_key(site.fingerprint_key_path))


@dataclass(frozen=True)
class Release:
    """One accounted release of the site's data: which run, round and purpose, its DP event and accounting."""

    run_id: str
    server_round: int
    purpose: str
    event: AnyDpEvent
    delta: float
    accountant: str
    guarantees: Guarantees | None = None  # a distributed-noise round: both guarantees (docs/distributed-dp.md)


def _accounted_reply(
    msg: Message,
    ledger: SiteLedger,
    site: Site,
    release: Release,
    *,
    adapter_hash: str,
    dataset_fingerprint: str,
    metrics: Mapping[str, float | int | list[float]],
    records: Mapping[str, ArrayRecord] | None = None,
    seeded_noise: bool = False,
) -> Message:
    """Record ``release`` in the site's ledger, then reply with what it covers: ``metrics`` and ``records`` plus
    the cumulative epsilon, the DP event and the site-signed attestation of the new ledger entry."""
    entry = ledger.append(
        run_id=release.run_id,
        server_round=release.server_round,
        adapter_hash=adapter_hash,
        dataset_fingerprint=dataset_fingerprint,
        event=release.event,
        delta=release.delta,
        accountant=release.accountant,
        max_epsilon=None if math.isinf(site.max_epsilon) else site.max_epsilon,
        seeded_noise=seeded_noise,
        data_source=site.data_source,
        purpose=release.purpose,
        guarantees=release.guarantees,
    )
    epsilon = entry.epsilon if math.isfinite(entry.epsilon) else -1.0
    return Message(
        RecordDict(
            {
                **(records or {}),
                C.METRICS_RECORD: MetricRecord({**metrics, C.METRIC_EPSILON: epsilon, C.METRIC_DELTA: release.delta}),
                C.DP_EVENT_RECORD: ConfigRecord({**release.event.to_dict(), "site-id": site.site_id}),
                C.ATTESTATION_RECORD: ConfigRecord(ledger.attestation(entry)),
            }
        ),
        reply_to=msg,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training round, or round 0's feature-mean query: one release of the site's data source at a time."""
    return _one_release_at_a_time(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """An evaluation of the server's adapter on the site's rows (:func:`_evaluate`): one release at a time."""
    return _one_release_at_a_time(msg, context, _evaluate)


def _one_release_at_a_time(msg: Message, context: Context, handler: Callable[[Message, Context], Message]) -> Message:
    """Run ``handler`` holding the lock of the site's data source (client/release_lock.py): its budget check and
    its ledger entry cannot interleave with another run's; a request meanwhile is declined (the other run is
    named in the site's log only)."""
    site = site_from_context(context)
    record = msg.content.config_records.get(C.TRAIN_CONFIG_RECORD) or msg.content.config_records.get(
        C.EVALUATE_CONFIG_RECORD
    )
    server_round = None if record is None else record.get(C.KEY_SERVER_ROUND)
    if not isinstance(server_round, int):  # the handler says what is wrong with it
        server_round = None
    try:
        with exclusive_release(
            site.ledger_path,
            site.data_source,
            holder=f"run {context.run_id}, round {server_round}, {msg.metadata.message_type}",
        ):
            return handler(msg, context)
    except ReleaseInProgress as e:
        logger.warning("data source %r is held by %s (lock %s)", site.data_source, e.holder, e.path)
        return _decline(msg, f"site {site.site_id}: {e}")


def _train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flower(context.run_config)
    site = site_from_context(context)
    server_round = int(config_value(msg.content, C.TRAIN_CONFIG_RECORD, C.KEY_SERVER_ROUND, int))  # type: ignore[call-overload]
    kind = _request_kind(msg)
    run_id = str(context.run_id)
    try:  # a deployed site's data, device, budget, task and ledger are its own: a run config overriding them is refused
        check_site_policy(cfg, site, context.node_config)
    except SitePolicyError as e:
        return _decline(msg, str(e))
    if kind == C.TASK_FEATURE_MEAN and not (cfg.center_features and server_round == 0):
        # the query is part of a centered run's plan (its cost is in the calibration), once, before round 1
        return _decline(
            msg,
            "a feature-mean query is only answered in round 0 of a run with center-features = true "
            f"(this is round {server_round}, center-features = {cfg.center_features})",
        )
    from client.distributed_round import opacus_event, update_from_step
    from client.train import noisy_feature_sum, train_round
    from shared.centering import answer_bound
    from shared.federation import site_training_rows
    from shared.model import flatten, get_trainable, set_trainable
    from shared.tasks import get_task

    task = get_task(cfg)
    refused = _missing_capability(cfg, task)
    if refused:
        return _decline(msg, refused)
    delta, accountant = site.accounting()  # the site's own, never the run config's
    purpose = PURPOSE_FEATURE_MEAN if kind == C.TASK_FEATURE_MEAN else PURPOSE_TRAIN

    rows = site_training_rows(cfg, site, task)
    if cfg.canaries and cfg.canary_kind == "text" and task.canary_audit is not None:
        rows = task.canary_audit.add_site_canaries(rows, cfg, site)
    canaries = None  # gradient canaries: which of this site's are inserted (shared/gradient_canaries.py)
    if cfg.canaries and cfg.canary_kind == "gradient" and kind == C.TASK_TRAIN:
        from shared.audit.canary import CanaryError
        from shared.gradient_canaries import site_canaries

        try:
            canaries = site_canaries(cfg.canaries, seed=cfg.seed, site=site)
        except CanaryError as e:
            return _decline(msg, str(e))
    ledger = _open_ledger(site)
    fingerprint = _fingerprint(site, rows)
    if ledger.find(run_id=run_id, server_round=server_round, purpose=purpose) is not None:
        return _decline(msg, f"round {server_round} of run {run_id} was already trained by this site (replay)")

    sample_rate = poisson_sample_rate(len(rows), cfg.batch_size)
    guarantees: Guarantees | None = None
    planned: AnyDpEvent
    if kind == C.TASK_FEATURE_MEAN:
        planned = centering_event(cfg)
    elif cfg.dp_noise == MODE_DISTRIBUTED:  # the noise is in the secure round's parameters: check, plan both
        from client.distributed_round import plan_round

        length = sum(a.size for a in arrays_from_record(msg.content, C.GLOBAL_RECORD).values())
        try:
            guarantees = plan_round(
                cfg, context, site, server_round=server_round, sample_rate=sample_rate, dimension=length
            )
        except DistributedDpError as e:
            return _decline(msg, f"site {site.site_id}: {e}")
        planned = guarantees.budgeted
    elif cfg.dp:
        planned = DpEvent(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier_for(cfg, sample_rate, context, delta=delta, accountant=accountant),
            steps=cfg.local_steps,
            clip_norm=cfg.max_grad_norm,
        )
    else:  # a non-private round: recorded as noise 0, i.e. epsilon = inf for this data from now on
        planned = DpEvent(sample_rate=sample_rate, noise_multiplier=0.0, steps=cfg.local_steps, clip_norm=1.0)
    decision = decide(
        ledger.history(site.data_source),  # every release of the site's data source, whatever its fingerprint
        planned,
        max_epsilon=site.max_epsilon,
        delta=delta,
        accountant=accountant,
    )
    if not decision.accept:
        return _decline(msg, f"site {site.site_id}: {decision.reason}")

    model = task.fresh_model(cfg, rows)
    global_arrays = arrays_from_record(msg.content, C.GLOBAL_RECORD)
    set_trainable(model, global_arrays)
    _set_center(msg, task, model)
    data = task.encode(cfg, rows)
    seed = _round_seed(cfg.seed, site.site_id, server_round) if cfg.reproducible_noise else None
    if kind == C.TASK_FEATURE_MEAN:
        vector = noisy_feature_sum(
            model,
            data,
            clip_norm=cfg.center_clip_norm,
            noise_multiplier=centering_event(cfg).noise_multiplier,
            seed=seed,
            device=site.device,
        )
        bound, loss = answer_bound(cfg.center_clip_norm), None  # clipping the noisy answer: post-processing
    else:
        before = flatten(get_trainable(model))
        result = train_round(
            model,
            data,
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            optimizer_name=cfg.optimizer,
            dp=cfg.dp,
            noise_multiplier=planned.noise_multiplier if isinstance(planned, DpEvent) else 0.0,  # distributed: 0
            max_grad_norm=cfg.max_grad_norm,
            seed=seed,
            device=site.device,
            micro_batch_size=cfg.micro_batch_size,
            autocast=cfg.autocast,
            loss_fn=task.loss,
            canaries=canaries,
        )
        expected = (
            planned if guarantees is None else opacus_event(sample_rate=sample_rate, max_grad_norm=cfg.max_grad_norm)
        )
        if result.event is not None and result.event != expected:
            raise RuntimeError(f"Opacus ran {result.event}, but the site planned and budgeted {planned}")
        vector, bound, loss = flatten(get_trainable(model)) - before, cfg.update_clip_norm, result.mean_loss
        if guarantees is not None:  # the clipped gradient sum over the public batch-size (shared/distributed_dp.py)
            vector = update_from_step(vector, num_rows=len(data), sample_rate=sample_rate, batch_size=cfg.batch_size)
    update, norm = clip_to_norm(vector, bound)
    if norm > bound:  # the norm is logged at the site only: under DP it is not released (issue 10, item 6)
        logger.warning("%s norm %.3f clipped to %.3f", "update" if kind == C.TASK_TRAIN else "answer", norm, bound)

    # Under DP nothing about the rows leaves the site outside the accounted mechanism: no loss, no update norm. A
    # non-private round (epsilon = inf already) may report its train loss.
    loss_metric = {C.METRIC_TRAIN_LOSS: loss} if not cfg.dp and loss is not None and math.isfinite(loss) else {}
    reply = _accounted_reply(
        msg,
        ledger,
        site,
        Release(run_id, server_round, purpose, planned, delta, accountant, guarantees),
        adapter_hash=digest_arrays(global_arrays),
        dataset_fingerprint=fingerprint,
        seeded_noise=cfg.dp and cfg.reproducible_noise,
        metrics=loss_metric,
        records={C.UPDATE_RECORD: ArrayRecord({C.UPDATE_ARRAY: Array(update.astype(np.float32))})},
    )
    if canaries is not None and result.canary_update is not None:  # kept at the site, for the simulation's audit
        from shared.gradient_canaries import record_site_round

        record_site_round(site.site_dir, run_id=run_id, server_round=server_round, values=result.canary_update)
    return reply


def _missing_capability(cfg: RunConfig, task: Task) -> str | None:
    """Why the site cannot run what the run config asks of this task (None: it can)."""
    if cfg.center_features and task.centering is None:
        return f"run config center-features = true, but task {task.name!r} has no feature centering"
    if cfg.canaries and cfg.canary_kind == "text" and task.canary_audit is None:
        return f"run config canaries = {cfg.canaries}, but task {task.name!r} has no text canaries"
    return None


def _set_center(msg: Message, task: Task, model: Any) -> None:
    """Set the feature center the server sent (a centered run), through the task's centering capability."""
    if C.CENTER_RECORD not in msg.content.array_records:
        return
    if task.centering is None:
        raise MessageError(f"the server sent a feature center, but task {task.name!r} has no feature centering")
    task.centering.set_center(model, arrays_from_record(msg.content, C.CENTER_RECORD)[C.CENTER_ARRAY])


def _evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's adapter on the site's own rows, if the site agreed to and its task can: DP-noised
    releases only.

    A site answers only when its own config opts in (node config ``allow-evaluate = true``, or a simulated
    site's site.toml) and its task has the ``site_evaluation`` capability (the classifier: the confusion matrix
    with Gaussian noise, client/evaluation.py); the release is checked against the site's budget and recorded in
    its ledger as an ``evaluate`` release, once per round of a run. The default ServerApp evaluates centrally on
    held-out data and never sends this request.
    """
    from shared.federation import site_training_rows
    from shared.model import set_trainable
    from shared.tasks import get_task

    cfg = RunConfig.from_flower(context.run_config)
    site = site_from_context(context)
    server_round = int(config_value(msg.content, C.EVALUATE_CONFIG_RECORD, C.KEY_SERVER_ROUND, int))  # type: ignore[call-overload]
    run_id = str(context.run_id)
    if not site.allow_evaluate:
        return _decline(
            msg,
            f"site {site.site_id} does not answer evaluate requests: its own config does not set allow-evaluate = "
            "true (exact metrics on its rows would be released outside its privacy budget)",
        )
    try:
        check_site_policy(cfg, site, context.node_config)
    except SitePolicyError as e:
        return _decline(msg, str(e))
    task = get_task(cfg)
    evaluation = task.site_evaluation
    if evaluation is None:
        return _decline(msg, f"task {task.name!r} has no DP-noised site evaluation: nothing about the rows is released")
    delta, accountant = site.accounting()

    rows = site_training_rows(cfg, site, task)
    ledger = _open_ledger(site)
    fingerprint = _fingerprint(site, rows)
    if ledger.find(run_id=run_id, server_round=server_round, purpose=PURPOSE_EVALUATE) is not None:
        return _decline(msg, f"round {server_round} of run {run_id} was already evaluated by this site (replay)")
    planned = evaluation.event(site.evaluate_noise_multiplier)
    decision = decide(
        ledger.history(site.data_source), planned, max_epsilon=site.max_epsilon, delta=delta, accountant=accountant
    )
    if not decision.accept:
        return _decline(msg, f"site {site.site_id}: {decision.reason}")

    model = task.fresh_model(cfg, rows)
    global_arrays = arrays_from_record(msg.content, C.GLOBAL_RECORD)
    set_trainable(model, global_arrays)
    _set_center(msg, task, model)
    released = evaluation.release(
        model, task.encode(cfg, rows), rows, noise_multiplier=planned.noise_multiplier, device=site.device
    )
    return _accounted_reply(  # recorded in the ledger before anything is released
        msg,
        ledger,
        site,
        Release(run_id, server_round, PURPOSE_EVALUATE, planned, delta, accountant),
        adapter_hash=digest_arrays(global_arrays),
        dataset_fingerprint=fingerprint,
        metrics=released,
    )


def _round_seed(seed: int, site_id: str, server_round: int) -> int:
    """Reproducible-noise seed: from the run seed alone (not the Flower run id), so that a run resumed from a
    checkpoint draws the noise the uninterrupted run would have drawn."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{site_id}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:6], "little")
