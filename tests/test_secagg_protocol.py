"""The SecAgg+ round, in process: correct sums, dropouts at every stage, aborts, and an active server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from shared.secagg import constants as K
from shared.secagg.client import PHASE_MASKED, SecAggClient
from shared.secagg.errors import SecAggAbort, SecAggMessageError, SecAggProtocolError
from shared.secagg.inprocess import make_clients, run_round
from shared.secagg.messages import (
    ConsistencyRequest,
    MaskedInputRequest,
    RoundParams,
    ShareKeysRequest,
    UnmaskRequest,
)
from shared.secagg.server import SecAggServer
from shared.secagg.settings import ClientPolicy, SecAggSettings

DIM = 300


def node_ids(n: int) -> list[int]:
    rng = np.random.default_rng(n)
    return sorted(int(x) for x in rng.integers(1, 2**63, size=n))  # Flower node ids are large


def updates_for(ids: list[int], *, clip: float = 1.0, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for nid in ids:
        u = rng.normal(size=DIM)
        out[nid] = (u / np.linalg.norm(u) * clip * rng.uniform(0.1, 1.0)).astype(np.float32)
    return out


def setup_round(
    tmp_path: Path, n: int, *, server_round: int = 1, run_id: str = "run-a", **settings: object
) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, np.ndarray]]:
    ids = node_ids(n)
    clients, roster = make_clients(tmp_path, ids)
    s = SecAggSettings(clip_norm=1.0, max_clients=100, **settings)  # type: ignore[arg-type]
    params = RoundParams.for_round(s, run_id=run_id, server_round=server_round, node_ids=ids)
    return SecAggServer(params, roster=roster), clients, updates_for(ids)


def plain_sum(updates: dict[int, np.ndarray], nodes: tuple[int, ...]) -> np.ndarray:
    return np.sum([updates[n].astype(np.float64) for n in nodes], axis=0)


def assert_sum_ok(server: SecAggServer, updates: dict[int, np.ndarray]) -> None:
    r = server.result()
    bound = len(r.survivors) * r.resolution
    assert np.max(np.abs(r.total - plain_sum(updates, r.survivors))) <= bound


# --- correct sums ------------------------------------------------------------------------------------


def test_all_clients_complete_graph_sum_equals_plain_sum(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 6)
    assert server.params.degree == 5  # n - 1: classic SecAgg
    run_round(server, clients, updates.__getitem__)
    assert_sum_ok(server, updates)
    assert server.result().survivors == tuple(sorted(updates))
    assert server.result().total_weight == 6.0


def test_all_clients_sparse_graph_sum_equals_plain_sum(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 20)
    assert server.params.degree == 10 < 19  # 2 * ceil(log2 20): SecAgg+
    run_round(server, clients, updates.__getitem__)
    assert_sum_ok(server, updates)


def test_weights_are_summed_into_total_weight(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 4, max_weight=2.0)
    weights = {nid: 2.0 for nid in updates}
    run_round(server, clients, lambda n: updates[n] * 2.0, weights=weights)
    r = server.result()
    assert r.total_weight == 8.0
    assert np.max(np.abs(r.total - 2.0 * plain_sum(updates, r.survivors))) <= 4 * r.resolution


def test_an_update_over_the_clip_bound_is_refused(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 4)
    victim = min(updates)
    with pytest.raises(ValueError, match="update L2 norm 5 exceeds clip_norm \\* weight = 1; clip before masking"):
        run_round(server, clients, lambda n: updates[n] if n != victim else np.full(DIM, 5 / DIM**0.5, np.float32))


# --- masked vectors look uniform -----------------------------------------------------------------------


def test_masked_vectors_are_indistinguishable_from_uniform(tmp_path: Path) -> None:
    ids = node_ids(3)
    clients, roster = make_clients(tmp_path, ids)
    params = RoundParams.for_round(SecAggSettings(clip_norm=1.0), run_id="u", server_round=1, node_ids=ids)
    server = SecAggServer(params, roster=roster)
    captured: list[np.ndarray] = []
    add = server.add_masked_input

    def capture(nid: int, masked: np.ndarray) -> None:
        captured.append(masked.copy())
        add(nid, masked)

    server.add_masked_input = capture  # type: ignore[method-assign]
    dim = 200_000
    run_round(server, clients, lambda n: np.zeros(dim, np.float32))  # the least random input there is
    assert len(captured) == 3
    for masked in captured:
        for shift in (24, 0):  # top byte and bottom byte of every coordinate: 256 bins each
            counts = np.bincount((masked >> shift) & 0xFF, minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-4
        assert stats.kstest(masked / 2.0**32, "uniform").pvalue > 1e-4


# --- dropouts ------------------------------------------------------------------------------------------


# The most dropouts each stage tolerates with n = 9 (complete graph, m = 9, t = 6, quorum q = 6): a client
# needs t neighbours' shares (advertise-keys, share-keys: 2), t survivors in its neighbourhood and q survivors
# (masked-input: 3), q signatures (consistency-check: 3), t shares of each secret (unmask: 3).
TOLERATED = {K.STAGE_ADVERTISE_KEYS: 2, K.STAGE_SHARE_KEYS: 2, K.STAGE_MASKED_INPUT: 3,
             K.STAGE_CONSISTENCY_CHECK: 3, K.STAGE_UNMASK: 3}  # fmt: skip


@pytest.mark.parametrize("stage", K.STAGES)
def test_dropouts_up_to_each_stages_tolerance_still_sum_right(tmp_path: Path, stage: str) -> None:
    server, clients, updates = setup_round(tmp_path, 9)
    dropped = set(sorted(updates)[:: 9 // TOLERATED[stage]][: TOLERATED[stage]])
    run_round(server, clients, updates.__getitem__, drop={stage: dropped})
    r = server.result()
    late = stage in (K.STAGE_CONSISTENCY_CHECK, K.STAGE_UNMASK)  # their inputs are already in the sum
    expected_survivors = set(updates) if late else set(updates) - dropped
    assert set(r.survivors) == expected_survivors
    assert set(r.dropped) == set(updates) - expected_survivors
    assert_sum_ok(server, updates)


@pytest.mark.parametrize("stage", [K.STAGE_ADVERTISE_KEYS, K.STAGE_SHARE_KEYS])
def test_one_dropout_more_than_the_tolerance_aborts(tmp_path: Path, stage: str) -> None:
    server, clients, updates = setup_round(tmp_path, 9)
    with pytest.raises(SecAggAbort, match="has 5 neighbours left, below threshold 6"):
        run_round(server, clients, updates.__getitem__, drop={stage: set(sorted(updates)[:3])})


@pytest.mark.parametrize("stage", K.STAGES)
def test_a_quarter_dropping_in_a_sparse_graph_still_sums_right(tmp_path: Path, stage: str) -> None:
    server, clients, updates = setup_round(tmp_path, 16)  # k = 8, m = 9, t = 6, q = 11

    def every_fourth(s: SecAggServer) -> set[int]:  # each neighbourhood of 9 ring neighbours loses <= 3
        return set(s.ring()[::4]) if s.advert_digest else set(sorted(updates)[::4])

    run_round(server, clients, updates.__getitem__, drop={stage: every_fourth})
    assert_sum_ok(server, updates)
    late = stage in (K.STAGE_CONSISTENCY_CHECK, K.STAGE_UNMASK)
    assert len(server.result().survivors) == (16 if late else 12)


def test_a_declining_client_counts_as_dropped_and_is_reported_declined(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 5)
    decliner = sorted(updates)[2]
    run_round(server, clients, updates.__getitem__, decline={decliner})
    r = server.result()
    assert r.declined == (decliner,) and decliner not in r.survivors and decliner not in r.dropped
    assert_sum_ok(server, updates)


# --- aborts --------------------------------------------------------------------------------------------


def test_too_few_inputs_abort_before_any_share_is_revealed(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 6)  # t = 4
    dropped = set(sorted(updates)[:3])
    with pytest.raises(SecAggAbort, match="only 3 masked inputs arrived, below threshold 4 or quorum 4"):
        run_round(server, clients, updates.__getitem__, drop={K.STAGE_MASKED_INPUT: dropped})
    assert server.aborted
    assert all(clients[n].state.phase == PHASE_MASKED for n in set(updates) - dropped)  # no unmask stage ran
    assert server._masked_sum is None
    with pytest.raises(SecAggAbort, match="was aborted"):
        server.result()


def test_too_few_unmask_replies_abort_without_a_result(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 6)  # t = 4
    with pytest.raises(SecAggAbort, match="only 3 shares of the self-mask seed of node .* below threshold 4"):
        run_round(server, clients, updates.__getitem__, drop={K.STAGE_UNMASK: set(sorted(updates)[:3])})
    assert server._masked_sum is None
    with pytest.raises(SecAggAbort):
        server.result()


def test_too_few_keys_advertised_abort_the_round(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 6)
    with pytest.raises(SecAggAbort, match="after advertise-keys, node .* has 2 neighbours left, below threshold 4"):
        run_round(server, clients, updates.__getitem__, drop={K.STAGE_ADVERTISE_KEYS: set(sorted(updates)[:3])})


def test_one_thin_neighbourhood_aborts_the_round_even_if_most_survive(tmp_path: Path) -> None:
    server, clients, updates = setup_round(tmp_path, 16)  # k = 8, t = 6
    with pytest.raises(SecAggAbort, match="neighbourhood has 5 survivors, below threshold 6"):
        run_round(server, clients, updates.__getitem__, drop={K.STAGE_MASKED_INPUT: lambda s: set(s.ring()[:4])})
    ring = server.ring()
    assert all(clients[n].state.phase == PHASE_MASKED for n in ring[4:])  # nobody was asked to sign or unmask


# --- an active server ----------------------------------------------------------------------------------


def _advance_to_share_keys(
    tmp_path: Path, **kw: object
) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, ShareKeysRequest]]:
    server, clients, _ = setup_round(tmp_path, 4, **kw)  # type: ignore[arg-type]
    params = server.advertise_request()
    server.receive_adverts({n: c.advertise_keys(params) for n, c in clients.items()})
    return server, clients, server.share_keys_requests()


def _others_first(req: ShareKeysRequest, victim: int) -> ShareKeysRequest:
    """The same request with the victim's own advert last (so index 0 and 1 are other nodes' adverts)."""
    return replace(req, adverts=tuple(sorted(req.adverts, key=lambda a: a.node_id == victim)))


def test_a_public_key_swapped_by_the_server_is_detected(tmp_path: Path) -> None:
    _, clients, requests = _advance_to_share_keys(tmp_path)
    victim, req = next(iter(requests.items()))
    req = _others_first(req, victim)
    from shared.secagg.crypto import generate_x25519

    _, server_key = generate_x25519()
    swapped = replace(req, adverts=(replace(req.adverts[0], mask_public_key=server_key), *req.adverts[1:]))
    with pytest.raises(SecAggProtocolError, match="are not signed by that site for run 'run-a' round 1"):
        clients[victim].share_keys(swapped)


def test_a_site_id_swapped_by_the_server_is_detected(tmp_path: Path) -> None:
    _, clients, requests = _advance_to_share_keys(tmp_path)
    victim, req = next(iter(requests.items()))
    req = _others_first(req, victim)
    a, b = req.adverts[0], req.adverts[1]
    swapped = replace(req, adverts=(replace(a, site_id=b.site_id), replace(b, site_id=a.site_id), *req.adverts[2:]))
    with pytest.raises(SecAggProtocolError, match="are not signed by that site"):
        clients[victim].share_keys(swapped)


def test_an_advert_replayed_from_another_round_is_rejected(tmp_path: Path) -> None:
    _, old_clients, old_requests = _advance_to_share_keys(tmp_path / "old")
    server, clients, _ = setup_round(tmp_path / "old", 4, server_round=2)
    params = server.advertise_request()
    server.receive_adverts({n: old_clients[n].advertise_keys(params) for n in clients})
    victim, req = next(iter(server.share_keys_requests().items()))
    req = _others_first(req, victim)
    old_advert = next(a for a in old_requests[victim].adverts if a.node_id == req.adverts[0].node_id)
    replayed = replace(req, adverts=(old_advert, *req.adverts[1:]))
    with pytest.raises(SecAggProtocolError, match="not signed by that site for run 'run-a' round 2"):
        old_clients[victim].share_keys(replayed)


def test_an_advert_replayed_from_another_run_is_rejected(tmp_path: Path) -> None:
    _, clients, old_requests = _advance_to_share_keys(tmp_path)
    server, _, _ = setup_round(tmp_path, 4, run_id="run-b")
    params = server.advertise_request()
    server.receive_adverts({n: c.advertise_keys(params) for n, c in clients.items()})
    victim, req = next(iter(server.share_keys_requests().items()))
    req = _others_first(req, victim)
    old_advert = next(a for a in old_requests[victim].adverts if a.node_id == req.adverts[0].node_id)
    with pytest.raises(SecAggProtocolError, match="not signed by that site for run 'run-b' round 1"):
        clients[victim].share_keys(replace(req, adverts=(old_advert, *req.adverts[1:])))


def test_a_repeated_round_is_refused(tmp_path: Path) -> None:
    server, clients, _ = setup_round(tmp_path, 4)
    client = next(iter(clients.values()))
    client.advertise_keys(server.params)
    with pytest.raises(SecAggProtocolError, match="round 1 of run 'run-a' is not after the last round it set up"):
        client.advertise_keys(server.params)


def test_a_stage_message_from_another_round_is_rejected(tmp_path: Path) -> None:
    _, clients, requests = _advance_to_share_keys(tmp_path)
    victim, req = next(iter(requests.items()))
    with pytest.raises(SecAggProtocolError, match="message for run 'run-a' round 7 replayed into run 'run-a' round 1"):
        clients[victim].share_keys(replace(req, server_round=7))


def test_a_share_ciphertext_replayed_from_another_round_fails_to_decrypt(tmp_path: Path) -> None:
    server1, clients1, _ = setup_round(tmp_path, 4)
    run_round(server1, clients1, updates_for(sorted(clients1)).__getitem__)
    old_ct = server1._ciphertexts  # round 1's ciphertexts, as a server could keep them
    server2, _, _ = setup_round(tmp_path, 4, server_round=2)
    p = server2.advertise_request()
    server2.receive_adverts({n: c.advertise_keys(p) for n, c in clients1.items()})
    server2.receive_encrypted_shares({n: clients1[n].share_keys(r) for n, r in server2.share_keys_requests().items()})
    victim, req = next(iter(server2.masked_input_requests().items()))
    src = req.src_node_ids[0]
    replayed = replace(req, ciphertexts=(old_ct[victim][src], *req.ciphertexts[1:]))
    with pytest.raises(SecAggProtocolError, match=f"shares from node {src} rejected: ciphertext does not decrypt"):
        clients1[victim].receive_shares(replayed)


def _advance_to_masked(
    tmp_path: Path, n: int = 4, **kw: object
) -> tuple[SecAggServer, dict[int, SecAggClient], list[int]]:
    """A round of ``n`` honest clients up to their masked inputs (nothing signed or revealed yet)."""
    server, clients, updates = setup_round(tmp_path, n, **kw)  # type: ignore[arg-type]
    p = server.advertise_request()
    server.receive_adverts({n: c.advertise_keys(p) for n, c in clients.items()})
    server.receive_encrypted_shares({n: clients[n].share_keys(r) for n, r in server.share_keys_requests().items()})
    for nid, r in server.masked_input_requests().items():
        clients[nid].receive_shares(r)
        server.add_masked_input(nid, clients[nid].mask_input(updates[nid]))
    return server, clients, sorted(clients)


def _signed(clients: dict[int, SecAggClient], signers: list[int], survivors: tuple[int, ...],
            dropped: tuple[int, ...] = ()) -> UnmaskRequest:  # fmt: skip
    """Each signer signs (U, D); the unmask request that carries their signatures."""
    sets = ConsistencyRequest(run_id="run-a", server_round=1, survivors=survivors, dropped=dropped)
    sigs = [clients[n].sign_survivors(sets) for n in signers]
    return UnmaskRequest(run_id="run-a", server_round=1, survivors=survivors, dropped=dropped,
                         signer_ids=tuple(signers), signatures=tuple(s.signature for s in sigs))  # fmt: skip


def test_a_client_never_gives_both_share_kinds_for_one_peer(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)
    me, peer = ids[0], ids[1]
    both = ConsistencyRequest(run_id="run-a", server_round=1, survivors=(me, peer), dropped=(peer,))
    with pytest.raises(SecAggProtocolError, match=f"nodes \\[{peer}\\] are listed as both survivor and dropped"):
        clients[me].sign_survivors(both)
    first = _signed(clients, ids, tuple(ids))
    assert peer in clients[me].unmask(first).seed_owner_ids
    with pytest.raises(SecAggProtocolError, match="stage out of order: in phase 'unmasked', expected 'signed'"):
        clients[me].unmask(first)


def test_a_client_signs_only_one_survivor_set_per_round(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)
    clients[ids[0]].sign_survivors(ConsistencyRequest(run_id="run-a", server_round=1, survivors=tuple(ids), dropped=()))
    other = ConsistencyRequest(run_id="run-a", server_round=1, survivors=tuple(ids[:3]), dropped=(ids[3],))
    with pytest.raises(SecAggProtocolError, match="stage out of order: in phase 'signed', expected 'masked'"):
        clients[ids[0]].sign_survivors(other)


def test_a_client_refuses_to_sign_a_neighbourhood_below_threshold(tmp_path: Path) -> None:
    server, clients, ids = _advance_to_masked(tmp_path, 12)  # k = 8, m = 9, t = 6, quorum 8
    me = ids[0]
    gone = tuple(sorted(clients[me].state.peer_ids[:4]))
    lying = ConsistencyRequest(run_id="run-a", server_round=1, survivors=tuple(sorted(set(ids) - set(gone))),
                               dropped=gone)  # fmt: skip
    with pytest.raises(SecAggProtocolError, match="only 5 of its neighbourhood survived, below the threshold 6"):
        clients[me].sign_survivors(lying)


def test_a_client_refuses_to_sign_a_survivor_set_below_the_quorum(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)  # n = 4, t = 3, quorum 3
    small = ConsistencyRequest(run_id="run-a", server_round=1, survivors=(ids[0], ids[1]), dropped=(ids[2], ids[3]))
    with pytest.raises(SecAggProtocolError, match="a survivor set of 2 is below the 3 this site needs"):
        clients[ids[0]].sign_survivors(small)


def test_unmask_without_a_quorum_of_signatures_reveals_nothing(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)  # quorum 3
    request = _signed(clients, ids[:2], tuple(ids))
    with pytest.raises(SecAggProtocolError, match="only 2 valid signatures on the survivor set, below the quorum 3"):
        clients[ids[0]].unmask(request)
    assert clients[ids[0]].state.phase == "signed"  # nothing revealed, nothing changed


def test_unmask_of_another_set_than_the_signed_one_reveals_nothing(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)
    _signed(clients, [ids[0]], tuple(ids))
    others = _signed(clients, ids[1:], tuple(ids))
    forged = replace(others, survivors=tuple(ids[:3]), dropped=(ids[3],))
    with pytest.raises(SecAggProtocolError, match="survivor set is not the one it signed"):
        clients[ids[0]].unmask(forged)


def test_a_signature_on_a_different_set_is_rejected(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path, 6)  # complete graph, t = 4, quorum 4
    u_a = tuple(ids)
    request = _signed(clients, ids[:3], u_a)
    u_b, d_b = tuple(ids[:5]), (ids[5],)
    stray = _signed(clients, [ids[4]], u_b, d_b)  # node 4 signed another set
    mixed = replace(request, signer_ids=(*request.signer_ids, ids[4]),
                    signatures=(*request.signatures, stray.signatures[0]))  # fmt: skip
    with pytest.raises(SecAggProtocolError, match=f"signature relayed for node {ids[4]} is not its site's signature"):
        clients[ids[0]].unmask(mixed)


def test_a_repeated_signer_is_rejected(tmp_path: Path) -> None:
    _, clients, ids = _advance_to_masked(tmp_path)
    request = _signed(clients, ids[:2], tuple(ids))
    doubled = replace(request, signer_ids=(*request.signer_ids, ids[1]),
                      signatures=(*request.signatures, request.signatures[1]))  # fmt: skip
    with pytest.raises(SecAggProtocolError, match=f"signature of node {ids[1]} repeated"):
        clients[ids[0]].unmask(doubled)


def test_shares_relayed_from_a_non_neighbour_are_refused(tmp_path: Path) -> None:
    server, clients, _ = setup_round(tmp_path, 4)
    p = server.advertise_request()
    server.receive_adverts({n: c.advertise_keys(p) for n, c in clients.items()})
    server.receive_encrypted_shares({n: clients[n].share_keys(r) for n, r in server.share_keys_requests().items()})
    victim, req = next(iter(server.masked_input_requests().items()))
    forged = MaskedInputRequest(
        run_id="run-a",
        server_round=1,
        src_node_ids=(*req.src_node_ids, 12345),
        ciphertexts=(*req.ciphertexts, b"x"),
    )
    with pytest.raises(SecAggProtocolError, match="shares relayed from node 12345, not a verified neighbour"):
        clients[victim].receive_shares(forged)


# --- a site's own limits ------------------------------------------------------------------------------


def _params(n: int, **settings: object) -> RoundParams:
    s = SecAggSettings(clip_norm=1.0, max_clients=100, **settings)  # type: ignore[arg-type]
    return RoundParams.for_round(s, run_id="run-a", server_round=1, node_ids=node_ids(n))


def test_a_client_refuses_a_threshold_below_its_floor(tmp_path: Path) -> None:
    params = _params(10, threshold=5)  # m = 9: 2t > m holds, but t < ceil(2m/3) = 6
    clients, _ = make_clients(tmp_path, params.node_ids)
    with pytest.raises(SecAggProtocolError, match="threshold t = 5 is below this site's floor 6"):
        clients[params.node_ids[0]].advertise_keys(params)


def test_a_client_refuses_a_degree_below_secagg_plus_s(tmp_path: Path) -> None:
    params = _params(16, degree=4, threshold=4)  # m = 5, t = ceil(10/3): the threshold floor holds
    clients, _ = make_clients(tmp_path, params.node_ids)
    with pytest.raises(SecAggProtocolError, match="degree 4 is below 8, the least this site accepts for a round of 16"):
        clients[params.node_ids[0]].advertise_keys(params)


def test_a_stricter_site_refuses_the_default_threshold(tmp_path: Path) -> None:
    params = _params(10)  # t = 6 of m = 9
    clients, _ = make_clients(tmp_path, params.node_ids, policy=ClientPolicy(threshold_fraction=0.9))
    with pytest.raises(SecAggProtocolError, match="threshold t = 6 is below this site's floor 9"):
        clients[params.node_ids[0]].advertise_keys(params)


def test_a_round_below_the_minimum_cohort_is_refused(tmp_path: Path) -> None:
    params = _params(3)
    clients, _ = make_clients(tmp_path, params.node_ids, policy=ClientPolicy(min_cohort=4))
    with pytest.raises(
        SecAggProtocolError, match="a round of 3 sampled nodes is below this site's minimum cohort of 4"
    ):
        clients[params.node_ids[0]].advertise_keys(params)


def test_a_two_site_round_is_refused_by_default(tmp_path: Path) -> None:
    params = _params(2)
    clients, _ = make_clients(tmp_path, params.node_ids)
    with pytest.raises(
        SecAggProtocolError, match="a round of 2 sampled nodes is below this site's minimum cohort of 3"
    ):
        clients[params.node_ids[0]].advertise_keys(params)


def test_an_advert_set_below_the_minimum_cohort_is_refused(tmp_path: Path) -> None:
    _, clients, requests = _advance_to_share_keys(tmp_path)  # 4 nodes
    victim, req = next(iter(requests.items()))
    req = _others_first(req, victim)
    with pytest.raises(SecAggProtocolError, match="advert set has 3 distinct roster sites; this site needs at least 4"):
        clients[victim].share_keys(replace(req, adverts=req.adverts[1:]))


def test_an_advert_set_without_the_clients_own_advert_is_refused(tmp_path: Path) -> None:
    _, clients, requests = _advance_to_share_keys(tmp_path)
    victim, req = next(iter(requests.items()))
    with pytest.raises(SecAggProtocolError, match="its own advert is missing from the round's advert set"):
        clients[victim].share_keys(replace(req, adverts=tuple(a for a in req.adverts if a.node_id != victim)))


def test_a_client_refuses_to_mask_with_fewer_than_t_neighbours(tmp_path: Path) -> None:
    server, clients, _ = setup_round(tmp_path, 4)  # k = 3, t = 3
    p = server.advertise_request()
    server.receive_adverts({n: c.advertise_keys(p) for n, c in clients.items()})
    server.receive_encrypted_shares({n: clients[n].share_keys(r) for n, r in server.share_keys_requests().items()})
    victim, req = next(iter(server.masked_input_requests().items()))
    short = replace(req, src_node_ids=req.src_node_ids[:2], ciphertexts=req.ciphertexts[:2])
    with pytest.raises(
        SecAggProtocolError, match="shares arrived from only 2 neighbours; this site masks with at least"
    ):
        clients[victim].receive_shares(short)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_cohort": 1}, "min_cohort must be an int >= 2, got 1"),
        ({"threshold_fraction": 0.6}, "threshold_fraction must be a number in \\[2/3, 1\\], got 0.6"),
        ({"threshold_fraction": 1.5}, "threshold_fraction must be a number in \\[2/3, 1\\], got 1.5"),
    ],
)
def test_client_policy_rejects_impossible_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientPolicy(**kwargs)


# --- parameters and messages ---------------------------------------------------------------------------


def test_default_degree_and_threshold() -> None:
    s = SecAggSettings(clip_norm=1.0)
    assert [(s.degree_for(n), s.threshold_for(n)) for n in (2, 3, 10, 50, 100)] == [
        (1, 2),
        (2, 2),
        (8, 6),
        (12, 9),
        (14, 10),
    ]


def test_round_params_reject_a_threshold_that_lets_the_server_unmask_someone() -> None:
    with pytest.raises(SecAggMessageError, match="must satisfy 2 <= t <= m and 2t > m .* m = 6 holders, got t = 3"):
        RoundParams(
            run_id="r", server_round=1, node_ids=(1, 2, 3, 4, 5, 6), degree=5, threshold=3,
            clip_norm=1.0, max_weight=1.0, max_clients=10,
        )  # fmt: skip


def test_round_params_reject_a_degree_the_graph_cannot_have() -> None:
    with pytest.raises(SecAggMessageError, match="degree 3 is not a valid degree for 10 nodes \\(it would be 4\\)"):
        RoundParams(
            run_id="r", server_round=1, node_ids=tuple(range(1, 11)), degree=3, threshold=3,
            clip_norm=1.0, max_weight=1.0, max_clients=10,
        )  # fmt: skip


def test_round_params_roundtrip_through_a_config() -> None:
    p = RoundParams.for_round(SecAggSettings(clip_norm=2.5), run_id="r", server_round=3, node_ids=[9, 4, 7])
    assert RoundParams.from_config(p.to_config()) == p
    assert p.node_ids == (4, 7, 9)


def test_a_message_with_a_missing_key_is_rejected() -> None:
    cfg = RoundParams.for_round(SecAggSettings(clip_norm=1.0), run_id="r", server_round=1, node_ids=[1, 2]).to_config()
    del cfg[K.KEY_THRESHOLD]
    with pytest.raises(SecAggMessageError, match="secagg message has no 'threshold'"):
        RoundParams.from_config(cfg)


def test_a_message_with_a_wrong_type_is_rejected() -> None:
    cfg = RoundParams.for_round(SecAggSettings(clip_norm=1.0), run_id="r", server_round=1, node_ids=[1, 2]).to_config()
    cfg[K.KEY_SERVER_ROUND] = "1"
    with pytest.raises(SecAggMessageError, match="secagg message field 'server-round' must be an int, got '1'"):
        RoundParams.from_config(cfg)


def test_a_message_of_another_stage_is_rejected() -> None:
    req = UnmaskRequest(run_id="r", server_round=1, survivors=(1,), dropped=())
    with pytest.raises(SecAggMessageError, match="expected a 'share-keys' secagg message, got 'unmask'"):
        ShareKeysRequest.from_config(req.to_config())


def test_lists_of_unequal_length_are_rejected() -> None:
    cfg = MaskedInputRequest(run_id="r", server_round=1, src_node_ids=(1, 2), ciphertexts=(b"a", b"b")).to_config()
    cfg[K.KEY_CIPHERTEXTS] = [b"a"]
    with pytest.raises(SecAggMessageError, match="secagg message lists must have equal lengths"):
        MaskedInputRequest.from_config(cfg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": -1.0}, "clip_norm must be finite and > 0, got -1.0"),
        ({"clip_norm": 1.0, "degree": 0}, "degree must be None or an int >= 1, got 0"),
        ({"clip_norm": 1.0, "threshold": 1}, "threshold must be None or an int >= 2, got 1"),
        ({"clip_norm": 1.0, "modulus_bits": 64}, "modulus_bits must be 32, got 64"),
        ({"clip_norm": 1.0, "on_abort": "retry"}, "on_abort must be 'skip' or 'stop', got 'retry'"),
        ({"clip_norm": 1.0, "max_clients": 1}, "max_clients must be an int >= 2, got 1"),
        ({"clip_norm": 1.0, "stage_timeout_s": 0}, "stage_timeout_s must be > 0, got 0"),
    ],
)
def test_settings_reject_impossible_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SecAggSettings(**kwargs)


def test_settings_reject_a_weak_threshold_for_the_round_size() -> None:
    with pytest.raises(ValueError, match="2t > m for a closed neighbourhood of m = 9 holders, got t = 4"):
        SecAggSettings(clip_norm=1.0, threshold=4).threshold_for(10)
