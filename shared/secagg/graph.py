"""The SecAgg+ neighbour graph: a circulant (Harary) graph over a pseudo-random ring of the sampled nodes.

Nodes are placed on a ring in the order of SHA-256(seed, node id), where the seed binds the run and round,
and each node is joined to the ``degree / 2`` nodes on either side. Every client computes the graph itself
from the signed round parameters, so the server cannot hand two clients inconsistent neighbourhoods.
``degree >= n - 1`` gives the complete graph (classic SecAgg); an odd degree below ``n - 1`` is rounded up
to the next even number (a circulant graph has even degree).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.secagg.crypto import bind, sha256


class GraphError(ValueError):
    """Impossible graph parameters."""


def effective_degree(n: int, degree: int) -> int:
    """The degree the graph really has for ``n`` nodes and a requested ``degree``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise GraphError(f"a neighbour graph needs n >= 2 nodes, got {n!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise GraphError(f"degree must be an int >= 1, got {degree!r}")
    if degree >= n - 1:
        return n - 1
    return min(n - 1, degree + degree % 2)


def ring_order(node_ids: Sequence[int], *, seed: bytes) -> list[int]:
    """The nodes in their pseudo-random ring order."""
    return sorted(node_ids, key=lambda nid: (sha256(bind(seed, nid)), nid))


def neighbours(node_ids: Sequence[int], *, degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours (itself excluded) in the graph of the given degree over ``node_ids``."""
    ids = list(node_ids)
    if len(set(ids)) != len(ids):
        raise GraphError("node ids must be distinct")
    k = effective_degree(len(ids), degree)
    if k == len(ids) - 1:
        everyone = frozenset(ids)
        return {nid: everyone - {nid} for nid in ids}
    ring = ring_order(ids, seed=seed)
    n, half = len(ring), k // 2
    return {
        nid: frozenset(ring[(pos + off) % n] for off in range(-half, half + 1) if off != 0)
        for pos, nid in enumerate(ring)
    }
