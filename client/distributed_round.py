"""A site's side of a distributed-noise round (``dp-noise = "distributed"``, docs/distributed-dp.md).

The train handler calls three things from here: :func:`plan_round` before training (the round's two guarantees,
from the secure-aggregation round parameters this site checked and signed, and its own node config),
:func:`opacus_event` (what Opacus must record: one step of clipping, noise 0) and :func:`update_from_step` (the
step rescaled to the public mean over ``batch-size``). The noise share itself is added by the secure-aggregation
client after encoding (:func:`shared.secagg.encoding.add_noise_share`), so it never exists outside the integer
domain and never leaves the site unmasked.

Training without noise is only safe inside the masked-input stage of a secure round whose parameters carry the
noise: :func:`plan_round` refuses otherwise (a plain train message, a stale round's state, parameters without
noise), so that a server cannot obtain a site's clipped gradient sum in the clear.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.config import RunConfig
from shared.distributed_dp import (
    DistributedDpError,
    DistributedPolicy,
    Guarantees,
    gradient_sum_update,
    plan_guarantees,
    policy_from_node_config,
    record_sensitivity,
)
from shared.privacy import DpEvent
from shared.secagg import constants as K
from shared.secagg.client import PHASE_READY, ClientRoundState
from shared.secagg.errors import SecAggMessageError
from shared.site import Site, read_site_settings


def masking_round(context: Any) -> int | None:
    """The round whose masked-input stage is running now (set by the secagg mod around the train handler)."""
    record = context.state.config_records.get(K.MASKING_STATE_RECORD)
    value = None if record is None else record.get(K.KEY_SERVER_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def site_distributed_policy(context: Any, site: Site) -> DistributedPolicy:
    """The site's ``min-survivors`` and ``budget-guarantee``: its node config, or a simulated site's site.toml."""
    settings = dict(context.node_config)
    if site.simulated:
        settings.update(read_site_settings(site.site_dir))
    return policy_from_node_config(settings)


def plan_round(
    cfg: RunConfig, context: Any, site: Site, *, server_round: int, sample_rate: float, dimension: int
) -> Guarantees:
    """Both guarantees of this round at this site, the enforced one chosen by its node config.

    Raises :class:`DistributedDpError` (the site declines) unless this is the masked-input stage of secure round
    ``server_round`` and its signed parameters carry distributed noise in at least the site's ``min-survivors``
    shares.
    """
    if masking_round(context) != server_round:
        raise DistributedDpError(
            f"dp-noise = 'distributed' trains without local noise, so this site sends its update only masked: "
            f"round {server_round} did not come through secure aggregation's masked-input stage"
        )
    stored = context.state.config_records.get(K.CLIENT_STATE_RECORD)
    try:
        state = None if stored is None else ClientRoundState.from_config(dict(stored))
    except SecAggMessageError as e:
        raise DistributedDpError(f"the secure-aggregation state is unreadable: {e}") from e
    if state is None or state.phase != PHASE_READY or state.params.server_round != server_round:
        raise DistributedDpError(f"no secure-aggregation round {server_round} is waiting for this site's input")
    sizing = state.params.noise_sizing
    if sizing is None:
        raise DistributedDpError(
            "the run config asks for dp-noise = 'distributed' but the secure-aggregation round carries no "
            "distributed noise: the site would send a noiseless gradient sum"
        )
    policy = site_distributed_policy(context, site)
    if sizing.shares < policy.min_survivors:
        raise DistributedDpError(
            f"the round's noise is split into {sizing.shares} shares, fewer than this site's min-survivors "
            f"{policy.min_survivors}"
        )
    sensitivity = record_sensitivity(
        learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size
    )
    return plan_guarantees(
        sample_rate=sample_rate,
        sensitivity=sensitivity,
        sizing=sizing,
        dimension=dimension,
        enforced=policy.budget_guarantee,
    )


def opacus_event(*, sample_rate: float, max_grad_norm: float) -> DpEvent:
    """What Opacus records for a distributed round: one Poisson-sampled step, clipping only (noise 0)."""
    return DpEvent(sample_rate=sample_rate, noise_multiplier=0.0, steps=1, clip_norm=max_grad_norm)


def update_from_step(delta: np.ndarray, *, num_rows: int, sample_rate: float, batch_size: int) -> np.ndarray:
    """Opacus divided the clipped sum by its expected batch size ``int(rows * sample_rate)``; the round's
    public normaliser is ``batch-size``."""
    return gradient_sum_update(delta, opacus_batch_size=int(num_rows * sample_rate), batch_size=batch_size)
