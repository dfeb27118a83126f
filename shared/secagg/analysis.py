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
smaller or the complete-graph construction meets the bound; otherwise a lower bound). Both must keep a
survivor set of ``max(q, min cohort)``, which only binds in rounds of a handful of sites. The server also
chooses how many sites it samples (and may raise, never lower, the degree and threshold): what a site is
protected by is the weakest round shape it accepts (:func:`weakest_round`), governed by its minimum cohort.
The numbers assume the colluders sit in T's neighbourhood: the graph is seeded by the advert set, which the
server alone cannot choose, but a colluding site can grind its own advert (it may advertise last), so
worst-case placement is the honest assumption.

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
    quorum_path: int  # at least this many colluders to show two different survivor sets with a quorum each
    server_with_sites: int  # the fewest colluding sites with which the server learns one site's update
    exact: bool  # False: server_with_sites is only a lower bound
    sites_alone: int  # the fewest colluding sites that learn one site's update without the server

    @property
    def closed_neighbourhood(self) -> int:
        return self.degree + 1


def consistent_path(n: int, closed_neighbourhood: int, threshold: int, *, min_cohort: int = DEFAULT_MIN_COHORT) -> int:
    """Colluders the server needs in T's neighbourhood with one survivor set for everybody.

    ``min(2t - m + 1, t - 1)``, and at least ``t + max(q, min cohort) - n``: the ``t - c`` honest peers of T
    are declared dropped, and the survivor set must keep ``max(q, min cohort)`` members.
    """
    m, t = closed_neighbourhood, threshold
    floor = t + max(consistency_quorum(n, t), min_cohort) - n
    return min(max(2 * t - m + 1, floor), max(t - 1, floor))


def quorum_construction(n: int, threshold: int, *, min_cohort: int = DEFAULT_MIN_COHORT) -> int:
    """Colluders with which the two-survivor-set attack works in a complete graph (see the module docstring).

    Honest clients split into T's group (size ``a``) and another (size ``b``); each group's set drops the
    other group's members (T's peer in the first group for the second set); each set needs ``q`` signers
    (``a + c``, ``b + c``) and ``max(q, min cohort)`` survivors (``n - b``, ``n - a + 1``).
    """
    t = threshold
    q = consistency_quorum(n, t)
    need = max(q, min_cohort)
    for c in range(n):
        for a in range(1, n - c):
            b = n - c - a
            if b >= 1 and a + c >= q and b + c >= q and n - b >= need and n - a + 1 >= need:
                return c
    return n - 1


def exposure(
    n: int, *, degree: int | None = None, threshold: int | None = None, min_cohort: int = DEFAULT_MIN_COHORT
) -> RoundExposure:
    """The exposure of a round of ``n`` sites (defaults: the project's degree and threshold for ``n``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"n must be an int >= 3 (a round needs t + 1 sites), got {n!r}")
    k = effective_degree(n, degree if degree is not None else default_degree(n))
    t = threshold if threshold is not None else default_threshold(k + 1)
    q = consistency_quorum(n, t)
    cons = consistent_path(n, k + 1, t, min_cohort=min_cohort)
    # pigeonhole: two sets that both gather q signatures; none if every set must hold every site
    lower = max(0, 2 * q - n) if max(q, min_cohort) < n else cons
    achievable = min(cons, quorum_construction(n, t, min_cohort=min_cohort)) if k == n - 1 else cons
    fewest = min(cons, lower)
    return RoundExposure(
        n=n,
        degree=k,
        threshold=t,
        quorum=q,
        consistent_path=cons,
        quorum_path=lower,
        server_with_sites=fewest,
        exact=fewest == achievable,
        sites_alone=max(q, min_cohort) - 1,
    )


def threat_rows(ns: tuple[int, ...] = (6, 9, 10, 12, 16, 40, 64, 100)) -> list[RoundExposure]:
    """The rows of the documented threat table (default degree, threshold and minimum cohort)."""
    return [exposure(n) for n in ns]


def weakest_round(*, min_cohort: int = DEFAULT_MIN_COHORT, max_n: int = 1000) -> RoundExposure:
    """The round shape (the server picks how many sites it samples) that needs the fewest colluders, among
    those a site accepts: at least ``min_cohort`` sites, degree and threshold at least the defaults (larger
    ones only need more colluders)."""
    rounds = [exposure(n, min_cohort=min_cohort) for n in range(max(3, min_cohort), max_n + 1)]
    return min(rounds, key=lambda r: (r.server_with_sites, r.n))
