"""Secure-aggregation settings (validated once), the defaults for the graph degree and the threshold, the
consistency quorum, and a site's own floor under what a server may ask (:class:`ClientPolicy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from shared.secagg.graph import effective_degree


def default_degree(n: int) -> int:
    """SecAgg+'s O(log n) degree: ``2 * ceil(log2 n)``, capped at ``n - 1`` (complete graph up to n = 8)."""
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(closed_neighbourhood: int) -> int:
    """``ceil(2m/3)`` of a closed neighbourhood of ``m = degree + 1`` holders.

    A curious server learns a client's input only if it gets both the self-mask seed and the mask key of the
    same client; every honest holder gives out at most one of the two, so the server needs ``2t - m`` holders
    colluding with it: at least ``ceil(m/3)`` here. The round survives up to ``m - t`` (about ``m/3``)
    dropouts per neighbourhood.
    """
    return math.ceil(2 * closed_neighbourhood / 3)


def check_threshold(threshold: int, closed_neighbourhood: int) -> None:
    """Raise unless ``2 <= t <= m`` and ``2t > m`` (no two disjoint sets of ``t`` holders exist)."""
    m = closed_neighbourhood
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"threshold must be an int, got {threshold!r}")
    if not 2 <= threshold <= m or 2 * threshold <= m:
        raise ValueError(
            f"threshold must satisfy 2 <= t <= m and 2t > m for a closed neighbourhood of m = {m} holders, "
            f"got t = {threshold}"
        )


def consistency_quorum(num_adverts: int, threshold: int) -> int:
    """``q = max(t, ceil(2n/3))``: valid signatures on one survivor set a client needs before it unmasks.

    ``n`` is the number of nodes in the round's verified advert set. Every honest client signs one set per
    round, so two different sets can both gather ``q`` signatures only if at least ``2q - n`` signers sign
    both: with fewer colluding sites, every honest client that reveals a share saw the same survivor set.
    """
    return max(threshold, math.ceil(2 * num_adverts / 3))


def threshold_floor(closed_neighbourhood: int, fraction: float) -> int:
    """The least threshold a site accepts for a closed neighbourhood of ``m`` holders: ``ceil(f * m)``."""
    return max(2, math.ceil(fraction * closed_neighbourhood - 1e-9))


DEFAULT_MIN_COHORT = 3
DEFAULT_THRESHOLD_FRACTION = 2 / 3


@dataclass(frozen=True, kw_only=True)
class ClientPolicy:
    """What a site itself requires of any round, whatever the server sends (from its own node config)."""

    min_cohort: int = field(
        default=DEFAULT_MIN_COHORT,
        metadata={"help": "fewest distinct roster sites in a round's advert set and survivor set"},
    )
    threshold_fraction: float = field(
        default=DEFAULT_THRESHOLD_FRACTION,
        metadata={"help": "refuse a threshold t below ceil(f * m), m = degree + 1; f in [2/3, 1]"},
    )
    min_survivors: int = field(
        default=3,
        metadata={"help": "distributed DP: fewest survivors whose noise shares the site relies on (>= 1)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.min_cohort, bool) or not isinstance(self.min_cohort, int) or self.min_cohort < 2:
            raise ValueError(f"min_cohort must be an int >= 2, got {self.min_cohort!r}")
        f = self.threshold_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 2 / 3 - 1e-9 <= f <= 1:
            raise ValueError(f"threshold_fraction must be a number in [2/3, 1], got {f!r}")
        m = self.min_survivors
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"min_survivors must be an int >= 1, got {m!r}")


@dataclass(frozen=True, kw_only=True)
class SecAggSettings:
    """How secure aggregation runs; converted once from the run config."""

    clip_norm: float = field(metadata={"help": "L2 bound C of a client's update before weighting"})
    max_clients: int = field(default=1000, metadata={"help": "most clients summed in a round (fixes the scale)"})
    degree: int | None = field(
        default=None, metadata={"help": "neighbours per client; None: 2*ceil(log2 n); >= n-1: classic SecAgg"}
    )
    threshold: int | None = field(
        default=None, metadata={"help": "Shamir threshold t; None: ceil(2(k+1)/3); must have 2t > k+1"}
    )
    max_weight: float = field(default=1.0, metadata={"help": "largest per-client weight"})
    modulus_bits: Literal[32] = field(default=32, metadata={"help": "sums are taken modulo 2^modulus_bits"})
    stage_timeout_s: float = field(default=60.0, metadata={"help": "timeout of each key/unmask stage"})
    on_abort: Literal["skip", "stop"] = field(
        default="skip", metadata={"help": "an aborted round: skip it and go on, or stop the run"}
    )
    dim: int | None = field(default=None, metadata={"help": "update length; other lengths are dropped"})
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "distributed DP: the aggregate's noise multiplier (0 = no distributed noise)"}
    )
    sensitivity: float = field(default=0.0, metadata={"help": "distributed DP: one record's L2 effect on an update"})
    min_survivors: int = field(
        default=0, metadata={"help": "distributed DP: shares M of the noise (0 = max(quorum, 3)), at most n"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.clip_norm, bool) or not isinstance(self.clip_norm, (int, float)):
            raise ValueError(f"clip_norm must be a number, got {self.clip_norm!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if isinstance(self.max_clients, bool) or not isinstance(self.max_clients, int) or self.max_clients < 2:
            raise ValueError(f"max_clients must be an int >= 2, got {self.max_clients!r}")
        if self.degree is not None and (
            isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1
        ):
            raise ValueError(f"degree must be None or an int >= 1, got {self.degree!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 2
        ):
            raise ValueError(f"threshold must be None or an int >= 2, got {self.threshold!r}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, (int, float)):
            raise ValueError(f"max_weight must be a number, got {self.max_weight!r}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be finite and > 0, got {self.max_weight}")
        if self.modulus_bits != 32:
            raise ValueError(f"modulus_bits must be 32, got {self.modulus_bits!r}")
        if not (isinstance(self.stage_timeout_s, (int, float)) and self.stage_timeout_s > 0):
            raise ValueError(f"stage_timeout_s must be > 0, got {self.stage_timeout_s!r}")
        if self.on_abort not in ("skip", "stop"):
            raise ValueError(f"on_abort must be 'skip' or 'stop', got {self.on_abort!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"dim must be None or an int >= 1, got {self.dim!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier!r}")
        if self.noise_multiplier > 0 and not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ValueError(f"distributed noise needs a sensitivity > 0, got {self.sensitivity!r}")
        if self.noise_multiplier > 0 and self.dim is None:
            raise ValueError("distributed noise needs dim (the update length) to size the noise")
        if isinstance(self.min_survivors, bool) or not isinstance(self.min_survivors, int) or self.min_survivors < 0:
            raise ValueError(f"min_survivors must be an int >= 0, got {self.min_survivors!r}")

    def degree_for(self, n: int) -> int:
        """The effective degree for a round of ``n`` sampled clients."""
        return effective_degree(n, self.degree if self.degree is not None else default_degree(n))

    def threshold_for(self, n: int) -> int:
        """The Shamir threshold for a round of ``n`` sampled clients (validated against the degree)."""
        m = self.degree_for(n) + 1
        t = self.threshold if self.threshold is not None else default_threshold(m)
        check_threshold(t, m)
        return t
