"""Who can learn one site's individual update: the fewest colluding sites, as a pure function of the round.

The attacker wants the input ``x_T`` of one target T. It holds T's masked vector
``y_T = x_T + PRG(b_T) + sum_{v in P_T} +-PRG(s_Tv)``, where ``P_T`` are the neighbours whose shares T
received (at least ``t`` of them: T refuses fewer), ``b_T`` T's self-mask seed and ``s_Tv`` the pairwise
secret of T and v (from either private mask key). It needs ``b_T`` (``t`` seed shares) and every ``s_Tv``:
v colludes, or v's mask key is rebuilt (``t`` key shares, which honest holders only give for a v in the
dropped set D). An honest client reveals only for a survivor set U it signed and that carries valid
signatures from ``q = max(t, ceil(2n/3))`` distinct nodes; it signs one set per round, only if it is in U,
``|U| >= max(q, min cohort)``, every neighbour it masked with is in U or D, and ``t`` of its closed
neighbourhood are in U. Colluding sites hand over every share and key they hold and sign anything.

Two ways remain, for a neighbourhood of ``m = k + 1`` holders and threshold ``t``:

- **consistent** (one (U, D) for everybody): the server relays to T the shares of ``t`` peers, ``c`` of
  them colluding, and puts the ``t - c`` honest ones in D. T's seed shares then come from its ``k - t``
  other neighbours, the ``c`` colluders, and T itself only if ``c + 1 >= t`` (T checks that ``t`` of the
  peers it masked with survived): ``k - t + c >= t`` needs ``c >= 2t - m + 1``; with T revealing,
  ``c >= t - 1`` suffices. So ``min(2t - m + 1, t - 1)`` colluders in T's neighbourhood, and that many
  also suffice (every honest holder of a dropped peer's key still sees >= t of its neighbourhood in U).
- **inconsistent** (different (U, D) for different honest clients): two different sets that both gather
  ``q`` signatures need at least ``2q - n`` nodes that sign both (each honest client signs once). In a
  complete graph that many are also enough: split the honest clients into two groups of ``n - q``, show
  the group with T a set in which the other group is dropped and vice versa (T's peers are everyone).
  In a sparse graph ``2q - n`` is only a lower bound for this path.

The fewest colluders with the server is the smaller of the two (exact whenever the consistent path is the
smaller or the graph is complete; otherwise a lower bound). The table assumes the colluders sit in T's
neighbourhood: the graph is seeded by the advert set, which the server alone cannot choose, but a colluding
site can grind its own advert (it may advertise last), so worst-case placement is the honest assumption.

Sites alone (the server honest) see no masked vector of anyone; they see the released sum of U, so ``c``
of them learn the rest's sum, one site's update once ``|U| - 1 <= c``: at least ``max(q, min cohort) - 1``.
That sum is what differential privacy protects (each site's update is DP-trained and clipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.secagg.graph import effective_degree
from shared.secagg.settings import DEFAULT_MIN_COHORT, consistency_quorum, default_degree, default_threshold


@dataclass(frozen=True)
class RoundExposure:
    """For one round shape: the numbers of the threat table in ``docs/secure-aggregation.md``."""

    n: int  # sites in the round's advert set
    degree: int  # k
    threshold: int  # t
    quorum: int  # q
    consistent_path: int  # colluders in T's neighbourhood that let the server unmask T with one (U, D)
    quorum_path: int  # colluders needed to show two different survivor sets with a quorum each
    server_with_sites: int  # the fewest colluding sites with which the server learns one site's update
    exact: bool  # False: server_with_sites is a lower bound (sparse graph, quorum path the smaller)
    sites_alone: int  # the fewest colluding sites that learn one site's update without the server

    @property
    def closed_neighbourhood(self) -> int:
        return self.degree + 1


def consistent_path(closed_neighbourhood: int, threshold: int) -> int:
    """``min(2t - m + 1, t - 1)``: colluders the server needs in T's neighbourhood with one survivor set."""
    m, t = closed_neighbourhood, threshold
    return min(2 * t - m + 1, t - 1)


def exposure(
    n: int, *, degree: int | None = None, threshold: int | None = None, min_cohort: int = DEFAULT_MIN_COHORT
) -> RoundExposure:
    """The exposure of a round of ``n`` sites (defaults: the project's degree and threshold for ``n``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"n must be an int >= 3 (a round needs t + 1 sites), got {n!r}")
    k = effective_degree(n, degree if degree is not None else default_degree(n))
    t = threshold if threshold is not None else default_threshold(k + 1)
    q = consistency_quorum(n, t)
    cons = consistent_path(k + 1, t)
    quorum = max(0, 2 * q - n)
    complete = k == n - 1
    return RoundExposure(
        n=n,
        degree=k,
        threshold=t,
        quorum=q,
        consistent_path=cons,
        quorum_path=quorum,
        server_with_sites=min(cons, quorum),
        exact=complete or cons <= quorum,
        sites_alone=max(q, min_cohort) - 1,
    )


def threat_rows(ns: tuple[int, ...] = (6, 9, 10, 12, 16, 40, 64, 100)) -> list[RoundExposure]:
    """The rows of the documented threat table (default degree, threshold and minimum cohort)."""
    return [exposure(n) for n in ns]
