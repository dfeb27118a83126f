"""Distributed DP under secure aggregation: the sizing of each site's noise share and its accounting (torch-free).

With ``dp-noise = "distributed"`` a round is one DP-SGD step on the union of the survivors' Poisson batches:
each site trains one SGD step under Opacus with noise 0 (per-sample clipping to ``C = max-grad-norm`` only), so
its update is ``-(lr / B) x`` the sum of its clipped per-sample gradients (``B = batch-size``, public). Adding or
removing one of its records moves that update by at most ``c = lr * C / B`` in L2 (:func:`record_sensitivity`);
clipping the whole update to ``update-clip-norm`` is a projection onto a ball, which never increases the distance
between two inputs, so ``c`` stays the sensitivity. The update is encoded in fixed point at a power-of-two
``scale`` with stochastic rounding, the site adds its integer noise share (discrete Gaussian,
:mod:`shared.discrete_noise`) and masks the result; the server unmasks only the sum and divides it by the public
number of survivors.

The round's public numbers (``scale``, the aggregate noise std ``sigma`` in fixed-point units, the number of
shares ``M`` the noise is split into) travel in the secure-aggregation round parameters, which every site signs
over, so all honest sites of a round use the same ones. Each site adds variance ``sigma^2 / M`` and refuses to
reveal any share unless at least ``M`` sites survived (``M`` at least its own node-config ``min-survivors``), so
the unmasked sum carries variance at least ``sigma^2`` from honest sites.

The bounds used (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", arXiv:2102.06387):

- Quantisation: one record moves a site's rounded vector by at most ``Delta = scale * c + sqrt(d)`` in L2
  (each of the ``d`` coordinates of the two roundings differs from the exact one by less than 1; Theorem 1's
  first bound, no conditional rounding). Stochastic rounding is a mixture over rounding outcomes, and every
  pair of outcomes is within ``Delta``, so the mixture is at least as private as the worst pair.
- Sum of discrete Gaussians: ``M`` independent ``N_Z(0, sigma^2 / M)`` summed give, at Renyi order ``a``,
  ``eps(a) = min(a Delta^2 / (2 sigma^2) + tau d, (a / 2) (Delta / sigma + tau sqrt(d))^2)`` with
  ``tau = 10 sum_{k=1}^{M-1} exp(-2 pi^2 (sigma^2 / M) k / (k + 1))`` (Theorem 1 / Proposition 14). One
  discrete Gaussian (``M = 1``, the fallback) has ``tau = 0``: ``a Delta^2 / (2 sigma^2)`` exactly (Canonne,
  Kamath, Steinke 2020).
- Poisson sampling of records at the site's rate ``q``: Zhu and Wang 2019 ("Poisson Subsampled Renyi
  Differential Privacy", Theorem 5), the general upper bound for any mechanism's RDP curve (the one the
  paper's experiments use), and never more than the unsampled ``eps(a)``.
- Composition over rounds: RDP orders add; ``(epsilon, delta)`` from RDP by
  ``min_a eps(a) + log(1 - 1/a) - log(delta a) / (a - 1)`` (as Opacus and dp_accounting convert).
- Modular wrap-around: the encoded sum of ``n`` sampled sites has ``|coordinate| <= n (bound * scale + 1)``
  from the data, and the noise of up to ``n`` shares of variance ``sigma^2 / M`` each is subgaussian with variance
  proxy ``n sigma^2 / M`` (a discrete Gaussian is subgaussian with its ``sigma^2``, CKS 2020), so
  ``P[any |noise_j| > T] <= 2 d exp(-T^2 / (2 n sigma^2 / M))``. :func:`size_noise` picks the largest scale for
  which data + ``T`` at failure probability :data:`WRAP_FAILURE` stays below ``2^31``; a site refuses round
  parameters that do not (:func:`wrap_problem`). Wrap-around is in any case post-processing of the exact integer
  sum: it could only spoil a round's model, never the privacy of the sum.

The ledger records both guarantees of every distributed round (:class:`Guarantees`): ``aggregate`` (against
whoever sees only the unmasked sum: at least ``M`` honest shares) and ``fallback`` (the site's own share alone,
if the server broke secure aggregation with colluding sites). The site's budget is enforced on the one its node
config chooses (``budget-guarantee``, default ``fallback``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from shared.privacy import DpEvent, PrivacyError, check_delta, compose_epsilon

MECHANISM = "distributed-discrete-gaussian"
MODE_LOCAL = "local"
MODE_DISTRIBUTED = "distributed"
DP_NOISE_MODES = (MODE_LOCAL, MODE_DISTRIBUTED)
GUARANTEE_AGGREGATE = "aggregate"
GUARANTEE_FALLBACK = "fallback"
GUARANTEES = (GUARANTEE_FALLBACK, GUARANTEE_AGGREGATE)

# node config keys (a site's own)
NODE_MIN_SURVIVORS = "min-survivors"
NODE_BUDGET_GUARANTEE = "budget-guarantee"
DEFAULT_MIN_SURVIVORS = 3

# Renyi orders: integers (Zhu-Wang's bound is stated for integer orders), dense where epsilons of 1-10 are decided
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)
WRAP_FAILURE = 1e-20  # probability that some coordinate of a round's noise exceeds the tail bound used
HALF_FIELD = 2**31  # sums are taken modulo 2^32 and decoded as signed 32-bit integers
_NORM_TOLERANCE = 1e-5  # as shared.secagg.encoding.NORM_TOLERANCE (float32 round-off at the clip bound)


class DistributedDpError(ValueError):
    """Impossible distributed-noise parameters, or a round that cannot give the guarantee it must."""


# -- the DP event of a distributed round ---------------------------------------------------------------------


@dataclass(frozen=True)
class DiscreteGaussianDpEvent:
    """``steps`` Poisson-sampled releases of a sum carrying ``shares`` independent discrete Gaussians.

    ``noise_stddev`` is the std of their sum and ``l2_sensitivity`` one record's L2 effect, both in fixed-point
    units; ``dimension`` is the vector's length (the quantisation and ``tau`` terms grow with it).
    """

    sample_rate: float
    steps: int
    l2_sensitivity: float
    noise_stddev: float
    shares: int
    dimension: int
    mechanism: str = MECHANISM

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PrivacyError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (math.isfinite(self.l2_sensitivity) and self.l2_sensitivity > 0.0):
            raise PrivacyError(f"l2_sensitivity must be finite and > 0, got {self.l2_sensitivity}")
        if not (math.isfinite(self.noise_stddev) and self.noise_stddev >= 0.0):
            raise PrivacyError(f"noise_stddev must be finite and >= 0, got {self.noise_stddev}")
        if isinstance(self.shares, bool) or not isinstance(self.shares, int) or self.shares < 1:
            raise PrivacyError(f"shares must be an int >= 1, got {self.shares!r}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            raise PrivacyError(f"dimension must be an int >= 1, got {self.dimension!r}")
        if self.mechanism != MECHANISM:
            raise PrivacyError(f"mechanism must be {MECHANISM!r}, got {self.mechanism!r}")

    @property
    def share_variance(self) -> float:
        return self.noise_stddev**2 / self.shares

    @property
    def tau(self) -> float:
        """DDGauss's inflation for a sum of ``shares`` discrete Gaussians (0 for one)."""
        v = self.share_variance
        return 10.0 * sum(math.exp(-2.0 * math.pi**2 * v * k / (k + 1)) for k in range(1, self.shares))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DiscreteGaussianDpEvent:
        fields = {"sample_rate", "steps", "l2_sensitivity", "noise_stddev", "shares", "dimension", "mechanism"}
        missing = fields - {"mechanism"} - raw.keys()
        if missing:
            raise PrivacyError(f"distributed DP event is missing {sorted(missing)}: {dict(raw)}")
        unknown = raw.keys() - fields
        if unknown:
            raise PrivacyError(f"distributed DP event has unknown keys {sorted(unknown)}: {dict(raw)}")
        return cls(
            sample_rate=float(raw["sample_rate"]),
            steps=int(raw["steps"]),
            l2_sensitivity=float(raw["l2_sensitivity"]),
            noise_stddev=float(raw["noise_stddev"]),
            shares=int(raw["shares"]),
            dimension=int(raw["dimension"]),
            mechanism=str(raw.get("mechanism", MECHANISM)),
        )


AnyDpEvent = DpEvent | DiscreteGaussianDpEvent


def event_from_dict(raw: Mapping[str, Any]) -> AnyDpEvent:
    """A ledger's event record: a distributed round's (it names its ``mechanism``) or a local DP-SGD round's."""
    if "mechanism" in raw:
        return DiscreteGaussianDpEvent.from_dict(raw)
    return DpEvent.from_dict(dict(raw))


# -- Renyi DP of the mechanism, sampled and composed ----------------------------------------------------------


def discrete_gaussian_rdp(event: DiscreteGaussianDpEvent, order: int) -> float:
    """RDP at ``order`` of one unsampled release (DDGauss Theorem 1 / Proposition 14; inf without noise)."""
    if event.noise_stddev == 0.0:
        return math.inf
    scale = event.l2_sensitivity / event.noise_stddev
    tau = event.tau
    return min(
        order * scale**2 / 2.0 + tau * event.dimension,
        order / 2.0 * (scale + tau * math.sqrt(event.dimension)) ** 2,
    )


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def poisson_subsampled_rdp(order: int, q: float, rdp: Any) -> float:
    """Zhu and Wang 2019, Theorem 5: RDP at integer ``order`` of a mechanism with RDP curve ``rdp`` run on a
    Poisson sample of rate ``q``, capped by the unsampled ``rdp(order)``:

    ``1/(a-1) log[(1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
    + 3 sum_{l=3..a} C(a,l) (1-q)^(a-l) q^l e^((l-1) eps(l))]``.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 2:
        raise PrivacyError(f"order must be an integer >= 2, got {order!r}")
    unsampled = float(rdp(order))
    if q == 1.0 or math.isinf(unsampled):
        return unsampled
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [
        (order - 1) * log_1q + math.log(order * q - q + 1.0),
        _log_comb(order, 2) + 2 * log_q + (order - 2) * log_1q + rdp(2),
    ]
    terms += [
        math.log(3.0) + _log_comb(order, ell) + (order - ell) * log_1q + ell * log_q + (ell - 1) * rdp(ell)
        for ell in range(3, order + 1)
    ]
    top = max(terms)
    sampled = (top + math.log(sum(math.exp(t - top) for t in terms))) / (order - 1)
    return min(unsampled, sampled)


def event_rdp(event: DiscreteGaussianDpEvent, orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP of ``event`` (all its steps) at ``orders``."""
    if event.steps == 0:
        return np.zeros(len(orders))
    return event.steps * np.asarray(_one_step_rdp(replace(event, steps=1), tuple(orders)), dtype=np.float64)


@lru_cache(maxsize=1024)  # pure and called for every entry of a history at every budget check
def _one_step_rdp(event: DiscreteGaussianDpEvent, orders: tuple[int, ...]) -> tuple[float, ...]:
    curve = lru_cache(maxsize=None)(lambda k: discrete_gaussian_rdp(event, k))
    return tuple(poisson_subsampled_rdp(a, event.sample_rate, curve) for a in orders)


def gaussian_rdp(event: DpEvent, orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP of a local DP-SGD event (Poisson-sampled Gaussian, Mironov et al. 2019) at ``orders``, from
    dp_accounting's own computation (exact for integer orders)."""
    if event.steps == 0:
        return np.zeros(len(orders))
    if event.noise_multiplier == 0.0:
        return np.full(len(orders), math.inf)
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian

    rdp = _compute_rdp_poisson_subsampled_gaussian(event.sample_rate, event.noise_multiplier, np.asarray(orders))
    return event.steps * np.asarray(rdp, dtype=np.float64)


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float, orders: Sequence[int] = RDP_ORDERS) -> float:
    """``min_a rdp(a) + log(1 - 1/a) - log(delta a) / (a - 1)`` (Opacus's and dp_accounting's conversion)."""
    check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return float(max(0.0, np.min(eps)))


def compose(events: Iterable[AnyDpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of local and distributed events.

    Only local events: the site's own accountant (PRV or RDP, :func:`shared.privacy.compose_epsilon`). With any
    distributed event: everything in RDP at :data:`RDP_ORDERS` (the discrete mechanism has no PRV analysis
    here; RDP is never below PRV's answer, so the mix is conservative).
    """
    events = list(events)
    if all(isinstance(e, DpEvent) for e in events):
        return compose_epsilon(events, delta=delta, accountant=accountant)  # type: ignore[arg-type]
    check_delta(delta)
    total = np.zeros(len(RDP_ORDERS))
    for e in events:
        total = total + (event_rdp(e) if isinstance(e, DiscreteGaussianDpEvent) else gaussian_rdp(e))
    if not np.any(total > 0.0):
        return 0.0
    return epsilon_from_rdp(total, delta=delta)


def calibrate_aggregate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    prior: Sequence[AnyDpEvent] = (),
    tolerance: float = 0.002,
) -> float:
    """The smallest aggregate noise multiplier (``sigma / Delta``, to within ``tolerance`` relative) whose
    ``rounds`` distributed rounds at ``sample_rate``, after the ``prior`` events, spend at most
    ``target_epsilon`` at ``delta`` under the aggregate guarantee (``tau`` taken as 0: shares of std >> 1)."""
    check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0.0):
        raise PrivacyError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    if rounds < 1:
        raise PrivacyError(f"rounds must be >= 1, got {rounds}")

    def eps(z: float) -> float:
        event = DiscreteGaussianDpEvent(
            sample_rate=sample_rate, steps=rounds, l2_sensitivity=1.0, noise_stddev=z, shares=1, dimension=1
        )
        return compose([*prior, event], delta=delta, accountant="rdp")

    high = 1.0
    while eps(high) > target_epsilon:
        high *= 2.0
        if high > 1e4:
            raise PrivacyError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    low = high / 2.0
    while low > 1e-3 and eps(low) <= target_epsilon:
        low /= 2.0
    while (high - low) / high > tolerance:
        mid = (low + high) / 2.0
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


# -- sizing: the scale, the aggregate noise and the wrap-around bound ----------------------------------------


def record_sensitivity(*, learning_rate: float, max_grad_norm: float, batch_size: int) -> float:
    """One record's L2 effect on a site's update (one SGD step, clipped per-sample gradients, mean over B)."""
    return learning_rate * max_grad_norm / batch_size


def integer_sensitivity(*, scale: float, sensitivity: float, dimension: int) -> float:
    """``Delta = scale * c + sqrt(d)``: a record's L2 effect on the stochastically rounded encoding."""
    return scale * sensitivity + math.sqrt(dimension)


def noise_tail(*, variance: float, dimension: int, failure: float = WRAP_FAILURE) -> float:
    """``T`` with ``P[some of d coordinates of a subgaussian(variance) vector exceeds T] <= failure``."""
    return math.sqrt(2.0 * variance * math.log(2.0 * dimension / failure))


def sum_bound(
    *,
    scale: float,
    clip_norm: float,
    max_weight: float,
    num_nodes: int,
    noise_stddev: float,
    shares: int,
    dimension: int,
) -> float:
    """The largest |coordinate| of the encoded noisy sum of up to ``num_nodes`` sites (at :data:`WRAP_FAILURE`)."""
    data = num_nodes * (clip_norm * max_weight * (1.0 + _NORM_TOLERANCE) * scale + 1.0)
    noise = noise_tail(variance=num_nodes * noise_stddev**2 / shares, dimension=dimension)
    return data + noise


@dataclass(frozen=True)
class NoiseSizing:
    """A round's public distributed-noise numbers: fixed-point ``scale``, aggregate std, number of shares."""

    scale: float
    noise_stddev: float
    shares: int


def size_noise(
    *,
    noise_multiplier: float,
    sensitivity: float,
    dimension: int,
    clip_norm: float,
    max_weight: float,
    num_nodes: int,
    shares: int,
) -> NoiseSizing:
    """The finest power-of-two scale at which the sum of ``num_nodes`` encodings plus their noise cannot wrap.

    The aggregate std is ``noise_multiplier * Delta`` with ``Delta`` the record's effect on the rounded encoding
    at that scale, so the effective noise multiplier of the aggregate is exactly ``noise_multiplier``.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise DistributedDpError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if not (math.isfinite(sensitivity) and sensitivity > 0.0):
        raise DistributedDpError(f"sensitivity must be finite and > 0, got {sensitivity}")
    if not 1 <= shares <= num_nodes:
        raise DistributedDpError(f"shares must be in 1..{num_nodes} (the sampled sites), got {shares}")
    for exponent in range(40, -41, -1):
        scale = 2.0**exponent
        stddev = noise_multiplier * integer_sensitivity(scale=scale, sensitivity=sensitivity, dimension=dimension)
        bound = sum_bound(
            scale=scale,
            clip_norm=clip_norm,
            max_weight=max_weight,
            num_nodes=num_nodes,
            noise_stddev=stddev,
            shares=shares,
            dimension=dimension,
        )
        if bound < HALF_FIELD - 1:
            return NoiseSizing(scale=scale, noise_stddev=stddev, shares=shares)
    raise DistributedDpError(
        f"no fixed-point scale fits {num_nodes} sites' updates (bound {clip_norm}) and noise multiplier "
        f"{noise_multiplier} over d = {dimension} coordinates in a 32-bit sum"
    )


def wrap_problem(
    sizing: NoiseSizing, *, clip_norm: float, max_weight: float, num_nodes: int, dimension: int
) -> str | None:
    """Why round parameters could wrap around (a site refuses them), or None."""
    bound = sum_bound(
        scale=sizing.scale,
        clip_norm=clip_norm,
        max_weight=max_weight,
        num_nodes=num_nodes,
        noise_stddev=sizing.noise_stddev,
        shares=sizing.shares,
        dimension=dimension,
    )
    if bound < HALF_FIELD - 1:
        return None
    return (
        f"the noisy sum of {num_nodes} sites at scale {sizing.scale:g} with noise std {sizing.noise_stddev:g} "
        f"in {sizing.shares} shares can reach {bound:.4g} over d = {dimension} coordinates, beyond 2^31: "
        "it could wrap around"
    )


# -- a site's two guarantees for a round ---------------------------------------------------------------------


@dataclass(frozen=True)
class Guarantees:
    """Both guarantees of one distributed round at one site, and the one its budget is enforced on."""

    aggregate: DiscreteGaussianDpEvent
    fallback: DiscreteGaussianDpEvent
    enforced: str

    def __post_init__(self) -> None:
        if self.enforced not in GUARANTEES:
            raise PrivacyError(f"enforced guarantee must be one of {GUARANTEES}, got {self.enforced!r}")

    @property
    def budgeted(self) -> DiscreteGaussianDpEvent:
        return self.aggregate if self.enforced == GUARANTEE_AGGREGATE else self.fallback

    def to_dict(self) -> dict[str, Any]:
        return {
            GUARANTEE_AGGREGATE: self.aggregate.to_dict(),
            GUARANTEE_FALLBACK: self.fallback.to_dict(),
            "enforced": self.enforced,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Guarantees:
        unknown = raw.keys() - {GUARANTEE_AGGREGATE, GUARANTEE_FALLBACK, "enforced"}
        if unknown:
            raise PrivacyError(f"guarantees record has unknown keys {sorted(unknown)}")
        try:
            return cls(
                aggregate=DiscreteGaussianDpEvent.from_dict(raw[GUARANTEE_AGGREGATE]),
                fallback=DiscreteGaussianDpEvent.from_dict(raw[GUARANTEE_FALLBACK]),
                enforced=str(raw["enforced"]),
            )
        except KeyError as e:
            raise PrivacyError(f"guarantees record is missing {e}") from e


def plan_guarantees(
    *, sample_rate: float, sensitivity: float, sizing: NoiseSizing, dimension: int, enforced: str
) -> Guarantees:
    """The round's aggregate guarantee (``sizing.shares`` honest shares) and fallback (the site's share alone)."""
    delta_int = integer_sensitivity(scale=sizing.scale, sensitivity=sensitivity, dimension=dimension)
    aggregate = DiscreteGaussianDpEvent(
        sample_rate=sample_rate,
        steps=1,
        l2_sensitivity=delta_int,
        noise_stddev=sizing.noise_stddev,
        shares=sizing.shares,
        dimension=dimension,
    )
    fallback = DiscreteGaussianDpEvent(
        sample_rate=sample_rate,
        steps=1,
        l2_sensitivity=delta_int,
        noise_stddev=sizing.noise_stddev / math.sqrt(sizing.shares),
        shares=1,
        dimension=dimension,
    )
    return Guarantees(aggregate=aggregate, fallback=fallback, enforced=enforced)


def gradient_sum_update(delta: np.ndarray, *, opacus_batch_size: int, batch_size: int) -> np.ndarray:
    """A site's one-step update rescaled from Opacus's mean (over its expected batch size,
    ``int(rows * sample_rate)``) to the public mean over ``batch-size``: ``-(lr / B) x`` the clipped sum."""
    if opacus_batch_size < 1 or batch_size < 1:
        raise DistributedDpError(f"batch sizes must be >= 1, got {opacus_batch_size} and {batch_size}")
    return np.asarray(delta, dtype=np.float64) * (opacus_batch_size / batch_size)


# -- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DistributedPolicy:
    """A site's own terms for distributed noise (its node config)."""

    min_survivors: int = DEFAULT_MIN_SURVIVORS
    budget_guarantee: str = GUARANTEE_FALLBACK  # "fallback" or "aggregate"

    def __post_init__(self) -> None:
        m = self.min_survivors
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise DistributedDpError(f"node config {NODE_MIN_SURVIVORS!r} must be an int >= 1, got {m!r}")
        if self.budget_guarantee not in GUARANTEES:
            raise DistributedDpError(
                f"node config {NODE_BUDGET_GUARANTEE!r} must be one of {list(GUARANTEES)}, "
                f"got {self.budget_guarantee!r}"
            )


def policy_from_node_config(node_config: Mapping[str, Any]) -> DistributedPolicy:
    """The site's :class:`DistributedPolicy` from its node config (defaults: 3 survivors, ``fallback``)."""
    return DistributedPolicy(
        min_survivors=node_config.get(NODE_MIN_SURVIVORS, DEFAULT_MIN_SURVIVORS),
        budget_guarantee=node_config.get(NODE_BUDGET_GUARANTEE, GUARANTEE_FALLBACK),
    )


def config_problem(
    *,
    dp_noise: str,
    dp: bool,
    secure_aggregation: bool,
    local_steps: int,
    optimizer: str,
    noise_multiplier: float,
    min_survivors: int,
) -> str | None:
    """Why a run config cannot run distributed noise (None when it can, or when it asks for local noise)."""
    if dp_noise not in DP_NOISE_MODES:
        return f"dp-noise must be one of {list(DP_NOISE_MODES)}, got {dp_noise!r}"
    if min_survivors < 0:
        return f"dp-min-survivors must be >= 0 (0 = the round's consistency quorum), got {min_survivors}"
    if dp_noise == MODE_LOCAL:
        return None
    if not dp:
        return "dp-noise = 'distributed' needs dp = true"
    if not secure_aggregation:
        return (
            "dp-noise = 'distributed' requires secure-aggregation = true: each site adds only a share of the "
            "noise, so its update must never be seen alone"
        )
    if local_steps != 1 or optimizer != "sgd":
        return (
            "dp-noise = 'distributed' is analysed only for one local SGD step per round (the aggregate is then "
            f"exactly one DP-SGD step on the union of the survivors' batches); got local-steps = {local_steps}, "
            f"optimizer = {optimizer!r}. More local steps are refused: the noise would enter between them"
        )
    if noise_multiplier <= 0.0:
        return (
            "dp-noise = 'distributed' needs noise-multiplier > 0 (the aggregate's, public and the same for every "
            "site; target-epsilon cannot be calibrated centrally without the sites' sample rates)"
        )
    return None
