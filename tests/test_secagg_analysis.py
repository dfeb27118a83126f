"""The threat table's numbers (shared/secagg/analysis.py), pinned and checked by exhaustive search.

The search below is an independent model of the client's rules (``shared/secagg/client.py``): for a given
graph, target T and set of colluding sites, it tries every set of peers the server could relay to T and
every single survivor/dropped assignment, and asks whether the server ends up with t seed shares of T and
the pairwise secret of T with every peer T masked with. The inconsistent path (different sets for
different clients) is bounded by counting signatures; ``tests/test_secagg_attack.py`` runs both paths
against the real clients at the table's numbers, and fails with one colluder fewer.
"""

from __future__ import annotations

import itertools

import pytest

from shared.secagg.analysis import consistent_path, exposure, threat_rows, weakest_round
from shared.secagg.graph import neighbours
from shared.secagg.settings import consistency_quorum

# n, k, t, q, fewest colluding sites with the server, fewest colluding sites alone (default settings)
TABLE = [
    (6, 5, 4, 4, 2, 3),
    (9, 8, 6, 6, 3, 5),
    (10, 8, 6, 7, 4, 6),
    (12, 8, 6, 8, 4, 7),
    (16, 8, 6, 11, 4, 10),
    (40, 12, 9, 27, 6, 26),
    (64, 12, 9, 43, 6, 42),
    (100, 14, 10, 67, 6, 66),
]


def test_the_threat_table_numbers() -> None:
    rows = [(r.n, r.degree, r.threshold, r.quorum, r.server_with_sites, r.sites_alone) for r in threat_rows()]
    assert rows == TABLE
    assert all(r.exact for r in threat_rows())


def test_the_server_alone_never_suffices_with_default_settings() -> None:
    assert all(exposure(n).server_with_sites >= 2 for n in range(4, 200))


def test_exposure_rejects_a_round_too_small() -> None:
    with pytest.raises(ValueError, match="n must be an int >= 3"):
        exposure(2)


def _server_unmasks_target(
    graph: dict[int, frozenset[int]], target: int, t: int, *, colluders: frozenset[int], min_cohort: int = 3
) -> bool:
    """Exhaustive: one (U, D) for every honest client; True if the server learns the target's update."""
    nodes = sorted(graph)
    q = consistency_quorum(len(nodes), t)
    honest = [h for h in nodes if h not in colluders and h != target]
    for size in range(t, len(graph[target]) + 1):
        for peers in itertools.combinations(sorted(graph[target]), size):
            p_t = frozenset(peers)
            book = {h: graph[h] | {h} for h in nodes}
            book[target] = p_t | {target}  # T only holds (and masks with) what it was relayed
            for target_status in "UD":
                for statuses in itertools.product("UDX", repeat=len(honest)):
                    status = dict(zip(honest, statuses, strict=True)) | dict.fromkeys(colluders, "U")
                    status[target] = target_status
                    u_set = {h for h in nodes if status[h] == "U"}
                    d_set = {h for h in nodes if status[h] == "D"}
                    if len(u_set) < max(q, min_cohort):
                        continue

                    revealers = {
                        h
                        for h in [*honest, target]
                        if h in u_set and book[h] - {h} <= u_set | d_set and len(book[h] & u_set) >= t
                    }
                    if len(revealers) + len(colluders) < q:
                        continue  # fewer than q signatures on the set: nobody reveals
                    if target_status == "U":
                        seed = len({h for h in revealers if target in book[h]}) + len(colluders & graph[target])
                        honest_peers = p_t - colluders
                        keys_ok = all(
                            v in d_set
                            and len({h for h in revealers if v in book[h] - {h}}) + len(colluders & graph[v]) >= t
                            for v in honest_peers
                        )
                        if seed >= t and keys_ok:
                            return True
                    else:  # T "dropped": its key from the honest, its seed from colluders only
                        seed = len(colluders & graph[target])
                        keys = len({h for h in revealers if target in book[h] - {h}}) + len(colluders & graph[target])
                        if seed >= t and keys >= t:
                            return True
    return False


def _fewest_colluders(graph: dict[int, frozenset[int]], target: int, t: int) -> int:
    others = sorted(set(graph) - {target})
    for c in range(len(others) + 1):
        if any(
            _server_unmasks_target(graph, target, t, colluders=frozenset(group))
            for group in itertools.combinations(others, c)
        ):
            return c
    raise AssertionError("never")


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [(3, 2, 2), (4, 3, 3), (5, 4, 4), (6, 5, 4), (7, 6, 5), (8, 4, 4)],  # complete graphs, default t; a ring
)
def test_the_consistent_path_formula_matches_an_exhaustive_search(n: int, degree: int, threshold: int) -> None:
    graph = neighbours(list(range(1, n + 1)), degree=degree, seed=b"any ring")
    assert _fewest_colluders(graph, 1, threshold) == consistent_path(n, degree + 1, threshold)


def test_the_weakest_round_a_site_accepts_is_set_by_its_minimum_cohort() -> None:
    """The server picks how many sites it samples: the default cohort of 3 admits rounds where 2 colluders
    suffice (at n = 3 that is also what 2 sites alone learn from the sum); 10 lifts it to 4, 16 to 6."""
    assert [(w.server_with_sites, w.n, w.exact) for w in (weakest_round(min_cohort=c) for c in (3, 10, 16))] == [
        (2, 3, True),
        (4, 12, True),
        (6, 16, True),
    ]


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8, 9])
def test_two_survivor_sets_reach_the_quorum_only_with_2q_minus_n_double_signers(n: int) -> None:
    """Every split of the honest clients between two sets (each signs one): both sets reach q iff c >= 2q - n."""
    q = consistency_quorum(n, exposure(n).threshold)
    for c in range(n + 1):
        honest = n - c
        both = any(a + c >= q and (honest - a) + c >= q for a in range(honest + 1))
        assert both == (c >= 2 * q - n), (n, c)
