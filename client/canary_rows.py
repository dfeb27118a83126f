"""A site's gradient canaries inside its DP optimizer (canary mode, :mod:`shared.gradient_canaries`).

Each of the site's canaries owns one audit coordinate: a parameter of the round's optimizer, never of the model.
At every logical DP-SGD step, before the batch's rows, each inserted canary is drawn with the step's Poisson
rate (coins from the step's own random source) and the drawn ones go through Opacus as rows of their own:
skipped micro-steps whose per-example gradients are the clip norm on the canary's coordinate, zero on every
weight of the model. A step costs (drawn canaries) x (the site's canaries + the model's trainable weights)
multiply-adds. Opacus clips and sums them with the batch's rows, and the step's last micro-step adds the
noise to the whole sum, coordinates included, once. The model's rows have zero per-example gradients on the
coordinates.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus.optimizers.optimizer import DPOptimizer
from torch import nn

from client.dp_random import RandomSource

CHUNK = 256  # canaries per skipped micro-step


class CanaryRows:
    """The audit coordinates of a site's canaries (``included[i]``: canary i is inserted) for one round."""

    def __init__(self, included: np.ndarray, *, clip_norm: float, sample_rate: float, source: RandomSource) -> None:
        included = np.asarray(included, dtype=bool)
        if included.ndim != 1:
            raise ValueError(f"canaries must be a 1-D array of inserted flags, got shape {included.shape}")
        if not clip_norm > 0.0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.included = included
        self.clip_norm = clip_norm
        self.sample_rate = sample_rate
        self.source = source
        self.coordinates = nn.Parameter(torch.zeros(len(included)))

    def attach(self, optimizer: DPOptimizer) -> None:
        """Make the coordinates parameters of the DP optimizer (clipped, noised and stepped with the model's)."""
        optimizer.original_optimizer.add_param_group({"params": [self.coordinates]})

    def no_rows(self, rows: int) -> None:
        """The coordinates' per-example gradients for ``rows`` of the model's rows: zero."""
        self.coordinates.grad_sample = torch.zeros(rows, len(self.included))  # type: ignore[attr-defined]

    def insert(self, optimizer: DPOptimizer, params: list[nn.Parameter]) -> int:
        """Draw the step's canaries and clip and accumulate them (skipped micro-steps of at most
        :data:`CHUNK` canaries each, so that memory stays one chunk times the site's canaries); returns how many."""
        coins = self.source.uniform(len(self.included))  # a coin for every canary: the draw count says nothing
        drawn = np.flatnonzero(self.included & (coins < self.sample_rate))
        for start in range(0, len(drawn), CHUNK):
            chunk = torch.from_numpy(drawn[start : start + CHUNK])
            rows = torch.zeros(len(chunk), len(self.included))
            rows[torch.arange(len(chunk)), chunk] = self.clip_norm
            for p in params:  # zero on the model: a view of one zero row, not len(chunk) copies of the weights
                zero = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
                p.grad_sample = zero.expand(len(chunk), *p.shape)  # type: ignore[attr-defined]
            self.coordinates.grad_sample = rows  # type: ignore[attr-defined]
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()  # clips and sums into summed_grad; no noise, no step of the weights
            optimizer.zero_grad(set_to_none=True)  # frees the per-example gradients, keeps the clipped sum
        return len(drawn)

    def update(self) -> np.ndarray:
        """The coordinates' change over the round (they start at 0)."""
        return self.coordinates.detach().cpu().numpy().astype(np.float64)
