"""The server's step from the mean update: FedAvg (apply it) or FedAdam (Reddi et al., ICLR 2021).

Both act only on the MEAN of the clients' updates, which is all secure aggregation reveals, so they are
post-processing of already-private releases and cost no privacy. FedAdam keeps per-coordinate moments of the
mean update across rounds: it averages the DP noise over rounds and rescales badly conditioned coordinates (a
classification head on a pooled embedding), which one or two local SGD steps cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ServerOptimizer:
    """``step(mean_update) -> the change to apply to the global trainable vector``; state is plain arrays."""

    kind: str = "fedavg"
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("fedavg", "fedadam"):
            raise ValueError(f"server optimizer must be 'fedavg' or 'fedadam', got {self.kind!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.learning_rate}")
        if not self.tau > 0:
            raise ValueError(f"server tau must be > 0, got {self.tau}")

    def step(self, mean_update: np.ndarray) -> np.ndarray:
        delta = np.asarray(mean_update, dtype=np.float64)
        if self.kind == "fedavg":
            return (self.learning_rate * delta).astype(np.float32)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.zeros_like(delta)
        if self.m.shape != delta.shape:
            raise ValueError(f"mean update has shape {delta.shape}, the optimizer state {self.m.shape}")
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta**2
        return (self.learning_rate * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state for the server's checkpoint (moments as lists, or None before the first step)."""
        return {
            "kind": self.kind,
            "learning_rate": self.learning_rate,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "m": None if self.m is None else self.m.tolist(),
            "v": None if self.v is None else self.v.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ServerOptimizer:
        opt = cls(
            kind=state["kind"],
            learning_rate=float(state["learning_rate"]),
            beta1=float(state["beta1"]),
            beta2=float(state["beta2"]),
            tau=float(state["tau"]),
        )
        if state.get("m") is not None:
            opt.m = np.asarray(state["m"], dtype=np.float64)
            opt.v = np.asarray(state["v"], dtype=np.float64)
        return opt
