"""Distributed DP under secure aggregation: noise shares, their sizing, the abort below the minimum, accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shared.config import ConfigError, RunConfig
from shared.discrete_noise import discrete_gaussian
from shared.distributed_dp import (
    HALF_FIELD,
    RDP_ORDERS,
    WRAP_FAILURE,
    DiscreteGaussianDpEvent,
    DistributedDpError,
    DistributedPolicy,
    Guarantees,
    NoiseSizing,
    compose,
    discrete_gaussian_rdp,
    epsilon_from_rdp,
    event_from_dict,
    gaussian_rdp,
    plan_guarantees,
    poisson_subsampled_rdp,
    policy_from_node_config,
    record_sensitivity,
    size_noise,
    sum_bound,
    wrap_problem,
)
from shared.privacy import DpEvent
from shared.secagg.encoding import EncodingError
from shared.secagg.errors import SecAggAbort
from shared.secagg.inprocess import make_clients, run_round
from shared.secagg.messages import RoundParams
from shared.secagg.server import SecAggServer
from shared.secagg.settings import ClientPolicy, SecAggSettings

DIM = 400
SENSITIVITY = 0.01  # one record's effect on an update (lr * C / B)


def node_ids(n: int) -> list[int]:
    return sorted(int(x) for x in np.random.default_rng(n).integers(1, 2**63, size=n))


def distributed_round(
    tmp_path: Path,
    n: int,
    *,
    min_survivors: int = 0,
    policy: ClientPolicy | None = None,
    noise: float = 1.0,
    dim: int = DIM,
) -> tuple[SecAggServer, dict]:
    ids = node_ids(n)
    clients, roster = make_clients(tmp_path, ids, policy=policy)
    settings = SecAggSettings(
        clip_norm=1.0, max_clients=100, dim=dim, noise_multiplier=noise, sensitivity=SENSITIVITY,
        min_survivors=min_survivors,
    )  # fmt: skip
    params = RoundParams.for_round(settings, run_id="run-d", server_round=1, node_ids=ids)
    return SecAggServer(params, roster=roster), clients


def zeros(_: int) -> np.ndarray:
    return np.zeros(DIM, dtype=np.float32)


# --- the noise in the unmasked sum --------------------------------------------------------------------------


def test_discrete_gaussian_sampler_has_the_requested_variance_and_mean() -> None:
    sigma = 321.5
    x = discrete_gaussian(200_000, sigma=sigma)
    assert x.dtype == np.int64
    # the sample variance of 2e5 draws is within 1.5% of sigma^2 with probability > 0.999 (its sd is 0.32%)
    assert abs(x.var() / sigma**2 - 1.0) < 0.015
    assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)


BIG = 20_000  # coordinates of the variance tests: the sample variance's sd is sqrt(2 / BIG) = 1%


def zeros_big(_: int) -> np.ndarray:
    return np.zeros(BIG, dtype=np.float32)


def test_noise_in_the_unmasked_sum_has_the_target_variance(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 6, min_survivors=6, dim=BIG)
    run_round(server, clients, zeros_big)
    p = server.params
    noise = server.result().total * p.dp_scale  # back in fixed-point units: the integer noise alone
    assert server.result().survivors == p.node_ids
    # 6 shares of variance sigma^2 / 6 sum to sigma^2. The tolerance (5%, 5 sd) fails if the shares were sized
    # for 5 or 7 survivors (ratio 1.2 or 0.86), or if one of the six had twice its variance (1.17)
    ratio = noise.var() / p.dp_noise_stddev**2
    assert abs(ratio - 1.0) < 0.05
    assert abs(noise.mean()) < 5 * p.dp_noise_stddev / math.sqrt(BIG)


def test_share_sized_for_the_minimum_gives_the_target_with_exactly_that_many_survivors(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 8, min_survivors=6, dim=BIG)
    gone = server.params.node_ids[:2]  # two drop before masking: exactly M = 6 shares remain
    run_round(server, clients, zeros_big, drop={"masked-input": gone})
    assert len(server.result().survivors) == 6
    ratio = (server.result().total * server.params.dp_scale).var() / server.params.dp_noise_stddev**2
    assert abs(ratio - 1.0) < 0.05


def test_per_site_share_shrinks_with_the_declared_minimum() -> None:
    sizes = [size_noise(noise_multiplier=1.0, sensitivity=SENSITIVITY, dimension=DIM, clip_norm=1.0,
                        max_weight=1.0, num_nodes=10, shares=m) for m in (1, 3, 10)]  # fmt: skip
    share_var = [s.noise_stddev**2 / s.shares / s.scale**2 for s in sizes]  # in update units
    assert share_var[0] > share_var[1] > share_var[2]
    assert share_var[0] / share_var[2] == pytest.approx(10.0, rel=0.05)


# --- a round below the minimum aborts before anything is unmasked ---------------------------------------------


def test_round_below_min_survivors_aborts_with_no_share_revealed(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 8, min_survivors=6)
    gone = server.params.node_ids[:3]  # 5 survive: the consistency quorum (6 of 8) would not hold either...
    refusals: dict[int, str] = {}
    with pytest.raises(SecAggAbort):
        run_round(server, clients, zeros, drop={"masked-input": gone}, refusals=refusals)
    assert all(c.state.phase != "unmasked" for c in clients.values())


def test_site_refuses_to_sign_or_unmask_below_the_round_minimum_even_with_a_quorum(tmp_path: Path) -> None:
    # 9 sampled, quorum ceil(2*9/3) = 6, noise in M = 8 shares: 7 survivors meet the quorum but not M
    server, clients = distributed_round(tmp_path, 9, min_survivors=8)
    assert server.params.dp_shares == 8
    gone = server.params.node_ids[:2]
    refusals: dict[int, str] = {}
    with pytest.raises(SecAggAbort):
        run_round(server, clients, zeros, drop={"masked-input": gone}, refusals=refusals)
    assert refusals and all("distributed DP noise in 8 shares" in r for r in refusals.values())
    assert all(c.state.phase != "unmasked" for c in clients.values())  # nobody revealed a share


def test_site_refuses_a_round_whose_noise_relies_on_fewer_survivors_than_its_own_minimum(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 6, min_survivors=4, policy=ClientPolicy(min_survivors=5))
    refusals: dict[int, str] = {}
    with pytest.raises(SecAggAbort):
        run_round(server, clients, zeros, refusals=refusals)
    assert len(refusals) == 6 and all("fewer than the 5 survivors" in r for r in refusals.values())


def test_site_minimum_above_the_cohort_is_refused(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 4, min_survivors=4, policy=ClientPolicy(min_survivors=7))
    refusals: dict[int, str] = {}
    with pytest.raises(SecAggAbort):
        run_round(server, clients, zeros, refusals=refusals)
    assert all("4 sites were sampled" in r for r in refusals.values())


def test_server_cannot_lower_the_noise_after_the_sites_signed_the_parameters(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 5, min_survivors=5)
    params = server.params
    weaker = RoundParams(**{**params.__dict__, "dp_noise_stddev": params.dp_noise_stddev / 10})
    assert weaker.digest != params.digest  # the noise is in what every site signs


# --- wrap-around --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "shares", "noise"), [(3, 3, 0.5), (10, 4, 1.0), (50, 10, 3.0), (200, 50, 0.8)])
def test_sizing_keeps_the_noisy_sum_inside_the_field(n: int, shares: int, noise: float) -> None:
    sizing = size_noise(noise_multiplier=noise, sensitivity=SENSITIVITY, dimension=10_000, clip_norm=0.5,
                        max_weight=1.0, num_nodes=n, shares=shares)  # fmt: skip
    bound = sum_bound(scale=sizing.scale, clip_norm=0.5, max_weight=1.0, num_nodes=n,
                      noise_stddev=sizing.noise_stddev, shares=shares, dimension=10_000)  # fmt: skip
    assert bound < HALF_FIELD
    # the finest such scale: twice as fine would not fit
    finer = sum_bound(scale=2 * sizing.scale, clip_norm=0.5, max_weight=1.0, num_nodes=n,
                      noise_stddev=2 * sizing.noise_stddev, shares=shares, dimension=10_000)  # fmt: skip
    assert finer >= HALF_FIELD - 1 or sizing.scale == 2.0**40


def test_worst_case_inputs_plus_tail_noise_decode_exactly_without_wrapping() -> None:
    n, shares, d = 10, 4, 1000
    sizing = size_noise(noise_multiplier=2.0, sensitivity=SENSITIVITY, dimension=d, clip_norm=1.0,
                        max_weight=1.0, num_nodes=n, shares=shares)  # fmt: skip
    data = n * (1.0 * (1 + 1e-5) * sizing.scale + 1)  # every site at the bound on one coordinate
    tail = math.sqrt(2 * n * sizing.noise_stddev**2 / shares * math.log(2 * d / WRAP_FAILURE))
    total = int(data + tail)
    assert total < HALF_FIELD - 1
    assert (np.array([total], dtype=np.int64) % 2**32).astype(np.uint32).astype(np.int64)[0] == total


def test_site_refuses_round_parameters_that_could_wrap(tmp_path: Path) -> None:
    server, clients = distributed_round(tmp_path, 5, min_survivors=5)
    p = server.params
    too_fine = NoiseSizing(scale=p.dp_scale * 64, noise_stddev=p.dp_noise_stddev * 64, shares=p.dp_shares)
    assert wrap_problem(too_fine, clip_norm=1.0, max_weight=1.0, num_nodes=5, dimension=DIM) is not None
    forged = RoundParams(**{**p.__dict__, "dp_scale": too_fine.scale, "dp_noise_stddev": too_fine.noise_stddev})
    forged_server = SecAggServer(forged, roster=None)
    with pytest.raises((SecAggAbort, EncodingError)):
        run_round(forged_server, clients, zeros)


# --- accounting ---------------------------------------------------------------------------------------------


def guarantees(q: float = 0.02, m: int = 5) -> Guarantees:
    sizing = size_noise(noise_multiplier=1.2, sensitivity=SENSITIVITY, dimension=DIM, clip_norm=1.0,
                        max_weight=1.0, num_nodes=10, shares=m)  # fmt: skip
    return plan_guarantees(sample_rate=q, sensitivity=SENSITIVITY, sizing=sizing, dimension=DIM, enforced="fallback")


def _dp_accounting_epsilon(events: list[DiscreteGaussianDpEvent], delta: float) -> float:
    """An independent accountant for unsampled releases: dp_accounting's RDP accountant on zCDP events."""
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant(orders=[float(a) for a in RDP_ORDERS])
    for e in events:
        rho = e.l2_sensitivity**2 / (2 * e.noise_stddev**2)
        acc.compose(dp_accounting.ZCDpEvent(rho=rho, xi=e.tau * e.dimension), e.steps)
    return float(acc.get_epsilon(delta))


def test_both_guarantees_of_unsampled_rounds_equal_dp_accounting() -> None:
    g = guarantees(q=1.0)
    assert g.aggregate.tau * DIM < 1e-300  # shares of std >> 1: the sum is a discrete Gaussian to 1e-300
    for event in (g.aggregate, g.fallback):
        events = [event, event]  # two rounds
        ours = compose(events, delta=1e-5, accountant="prv")
        assert ours == pytest.approx(_dp_accounting_epsilon(events, 1e-5), rel=1e-9)
    fallback = compose([g.fallback], delta=1e-5, accountant="rdp")
    assert fallback > compose([g.aggregate], delta=1e-5, accountant="rdp")


def test_sampled_bound_is_never_below_the_exact_sampled_gaussian_of_dp_accounting() -> None:
    # Zhu-Wang's general bound, applied to a Gaussian's RDP curve, is an upper bound on Mironov's exact
    # sampled-Gaussian RDP (computed by dp_accounting): ours is valid, and not much looser
    for q, z in ((0.01, 0.8), (0.05, 1.2), (0.2, 2.0)):
        exact = gaussian_rdp(DpEvent(sample_rate=q, noise_multiplier=z, steps=1, clip_norm=1.0))
        ours = np.array([poisson_subsampled_rdp(a, q, lambda k, z=z: k / (2 * z * z)) for a in RDP_ORDERS])
        assert np.all(ours >= exact * (1 - 1e-9))
        ratio = epsilon_from_rdp(100 * ours, delta=1e-5) / epsilon_from_rdp(100 * exact, delta=1e-5)
        assert 1.0 <= ratio < 1.6  # measured: 1.47 (q=0.01, z=0.8), looser at small noise


def test_discrete_gaussian_rdp_pins_the_theorem() -> None:
    e = DiscreteGaussianDpEvent(sample_rate=1.0, steps=1, l2_sensitivity=3.0, noise_stddev=4.0, shares=2, dimension=5)
    tau = 10 * math.exp(-2 * math.pi**2 * 8.0 * 0.5)
    assert e.tau == pytest.approx(tau)
    assert discrete_gaussian_rdp(e, 4) == pytest.approx(min(4 * 9 / 32 + tau * 5, 2 * (0.75 + tau * math.sqrt(5)) ** 2))


def test_composition_of_local_and_distributed_rounds_adds_their_rdp() -> None:
    g = guarantees()
    local = DpEvent(sample_rate=0.02, noise_multiplier=1.0, steps=3, clip_norm=1.0)
    from shared.distributed_dp import event_rdp

    both = compose([local, g.aggregate], delta=1e-5, accountant="prv")
    assert both == pytest.approx(epsilon_from_rdp(gaussian_rdp(local) + event_rdp(g.aggregate), delta=1e-5))
    assert both > compose([g.aggregate], delta=1e-5, accountant="prv")


def test_guarantees_round_trip_through_their_record() -> None:
    g = guarantees()
    assert Guarantees.from_dict(g.to_dict()) == g
    assert event_from_dict(g.aggregate.to_dict()) == g.aggregate
    assert g.budgeted == g.fallback
    assert plan_guarantees(sample_rate=0.02, sensitivity=SENSITIVITY,
                           sizing=NoiseSizing(scale=g.aggregate.l2_sensitivity, noise_stddev=1.0, shares=1),
                           dimension=DIM, enforced="aggregate").budgeted.shares == 1  # fmt: skip


def test_record_sensitivity_is_one_clipped_gradient_over_the_public_batch() -> None:
    assert record_sensitivity(learning_rate=0.5, max_grad_norm=2.0, batch_size=8) == 0.125


# --- bad configuration --------------------------------------------------------------------------------------


def _cfg(**kw: object) -> RunConfig:
    base: dict[str, object] = {"dp_noise": "distributed", "noise_multiplier": 1.0, "target_epsilon": 0.0,
                               "local_steps": 1, "optimizer": "sgd"}  # fmt: skip
    return RunConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_distributed_noise_config_is_accepted_with_secure_aggregation_and_one_sgd_step() -> None:
    assert _cfg().dp_noise == "distributed"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"secure_aggregation": False}, "requires secure-aggregation = true"),
        ({"local_steps": 2}, "local-steps = 2"),
        ({"optimizer": "adam"}, "optimizer = 'adam'"),
        ({"noise_multiplier": 0.0, "target_epsilon": 3.0}, "needs noise-multiplier > 0"),
        ({"dp": False}, "needs dp = true"),
        ({"dp_min_survivors": -1}, "dp-min-survivors must be >= 0"),
    ],
)
def test_bad_distributed_config_is_a_config_error(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**override)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"min-survivors": 0}, "'min-survivors' must be an int >= 1"),
        ({"min-survivors": "3"}, "'min-survivors' must be an int >= 1"),
        ({"budget-guarantee": "central"}, "'budget-guarantee' must be one of"),
    ],
)
def test_bad_node_policy_is_refused(node_config: dict[str, object], message: str) -> None:
    with pytest.raises(DistributedDpError, match=message):
        policy_from_node_config(node_config)


def test_node_policy_defaults_to_the_fallback_guarantee() -> None:
    assert policy_from_node_config({}) == DistributedPolicy(min_survivors=3, budget_guarantee="fallback")


def test_sizing_refuses_more_shares_than_sites() -> None:
    with pytest.raises(DistributedDpError, match="shares must be in 1..3"):
        size_noise(noise_multiplier=1.0, sensitivity=SENSITIVITY, dimension=DIM, clip_norm=1.0, max_weight=1.0,
                   num_nodes=3, shares=4)  # fmt: skip


# --- the site ledger ----------------------------------------------------------------------------------------


def _append(ledger, g: Guarantees, event=None, server_round: int = 1):  # type: ignore[no-untyped-def]
    from shared.ledger import keyed_fingerprint_rows

    return ledger.append(
        run_id="r",
        server_round=server_round,
        adapter_hash="sha256:x",
        dataset_fingerprint=keyed_fingerprint_rows([("a", 1)], key=b"k" * 32),
        event=g.budgeted if event is None else event,
        delta=1e-5,
        accountant="prv",
        guarantees=g,
    )


def test_ledger_records_both_guarantees_and_reopens_them(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.ledger import SiteLedger

    key = Ed25519PrivateKey.generate()
    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="s", signing_key=key)
    g = guarantees()
    entry = _append(ledger, g)
    assert entry.guarantees == g and entry.event == g.fallback
    assert entry.epsilon == pytest.approx(compose([g.fallback], delta=1e-5, accountant="prv"))
    reopened = SiteLedger(tmp_path / "l.jsonl", site_id="s", public_key=key.public_key()).entries()[0]
    assert reopened.guarantees == g
    assert reopened.event_for("aggregate") == g.aggregate


def test_ledger_refuses_an_event_that_is_not_the_enforced_guarantee(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.ledger import LedgerError, SiteLedger

    ledger = SiteLedger(tmp_path / "l.jsonl", site_id="s", signing_key=Ed25519PrivateKey.generate())
    g = guarantees()
    with pytest.raises(LedgerError, match="its event is the enforced one"):
        _append(ledger, g, event=g.aggregate)  # fallback enforced: recording the weaker-looking aggregate is refused
    assert ledger.entries() == []


def test_calibrated_aggregate_noise_spends_the_target_epsilon() -> None:
    from shared.distributed_dp import calibrate_aggregate_noise

    z = calibrate_aggregate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, rounds=20)
    event = DiscreteGaussianDpEvent(
        sample_rate=0.05, steps=20, l2_sensitivity=1.0, noise_stddev=z, shares=1, dimension=1
    )
    assert compose([event], delta=1e-5, accountant="rdp") <= 3.0
    weaker = DiscreteGaussianDpEvent(
        sample_rate=0.05, steps=20, l2_sensitivity=1.0, noise_stddev=z * 0.99, shares=1, dimension=1
    )
    assert compose([weaker], delta=1e-5, accountant="rdp") > 3.0
