"""Where a site's DP randomness comes from: the operating system's CSPRNG, or a seeded generator for experiments.

Everything the DP guarantee rests on is random: which rows a Poisson batch draws, the Gaussian noise added to
the clipped gradient sum, the noise of the centering query. Opacus draws them from a ``torch.Generator`` (a
Mersenne Twister / Philox stream, predictable from a few outputs) unless ``torchcsprng`` is installed, which no
longer builds for current torch (it is archived and not on PyPI for it). So a site draws them here:

- :class:`SecureRandom` (the default): bytes from ``os.urandom`` (the kernel's CSPRNG), turned into 53-bit
  uniforms, Poisson coins (``uniform < q``) and Gaussians (Box-Muller in float64). Each Gaussian is the sum of
  four draws halved, as Opacus's ``secure_mode`` does (Holohan and Braghin, arXiv:2107.10138, section 5.1), so
  that the set of floating-point values the noise can take does not give the noiseless value away.
- :class:`SeededRandom` (``reproducible-noise = true``): a ``torch.Generator`` seeded from the run seed, so that
  two runs draw the same batches and noise. The server knows that seed: experiments only.

:class:`DpEngine` is Opacus's ``PrivacyEngine`` with both draws taken from a :class:`RandomSource`: its
optimizer (:class:`SourcedNoiseOptimizer`) adds noise from the source, its data loader samples Poisson batches
(:class:`PoissonBatchSampler`) with the source's coins. Clipping, per-sample gradients and the accountant are
Opacus's own, untouched.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler

# Opacus warns in PrivacyEngine() whenever torchcsprng's secure_mode is off; with a SecureRandom source the
# noise and sampling DO come from a CSPRNG, so this one warning (and only it) is not true of this engine.
OPACUS_SECURE_RNG_WARNING = r"Secure RNG turned off\."

_TWO_POW_MINUS_53 = 2.0**-53


class RandomSource(Protocol):
    """The two draws DP-SGD needs: Poisson coins and Gaussian noise."""

    secure: bool  # True when the draws come from a cryptographically secure generator

    def uniform(self, n: int) -> np.ndarray:
        """``n`` independent float64 uniforms in [0, 1)."""
        ...

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """A tensor of independent N(0, std^2) draws."""
        ...


class SecureRandom:
    """Draws from ``os.urandom``; nothing about them can be predicted from earlier outputs or a seed."""

    secure = True

    def uniform(self, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53  # the top 53 bits: k / 2^53

    def _standard_normal(self, n: int) -> np.ndarray:
        """``n`` N(0, 1) float64 draws by Box-Muller (two uniforms give two independent Gaussians)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: log never sees 0
        angle = 2.0 * math.pi * u[1]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
        if not std >= 0.0:
            raise ValueError(f"std must be >= 0, got {std}")
        n = math.prod(shape)
        # Opacus's secure_mode construction: (z1 + z2 + z3 + z4) / 2 of four N(0, std^2) draws is N(0, std^2)
        draws = self._standard_normal(4 * n).reshape(4, n).sum(axis=0) * (std / 2.0)
        return torch.from_numpy(draws.reshape(shape)).to(device=device, dtype=dtype)


class SeededRandom:
    """Draws from a seeded ``torch.Generator``: the same seed gives the same draws (reproducible-noise)."""

    secure = False

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> np.ndarray:
        return torch.rand(n, generator=self.generator, dtype=torch.float64).numpy()

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
        if not std >= 0.0:
            raise ValueError(f"std must be >= 0, got {std}")
        draws = torch.normal(0.0, std, size=shape, generator=self.generator, dtype=torch.float64)
        return draws.to(device=device, dtype=dtype)


def random_source(seed: int | None) -> RandomSource:
    """The CSPRNG, or with a seed (reproducible-noise, experiments only) the seeded generator."""
    return SecureRandom() if seed is None else SeededRandom(seed)


class PoissonBatchSampler(Sampler[list[int]]):
    """Each of ``num_samples`` rows enters each batch independently with probability ``sample_rate``.

    ``len()`` is ``num_batches``, the number of batches of the non-private loader, so that Opacus's
    ``make_private`` reads the sample rate ``1 / len(loader)`` it accounts. A batch may be empty.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, num_batches: int, source: RandomSource) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_batches <= 0:
            raise ValueError(f"num_batches must be > 0, got {num_batches}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.num_batches = num_batches
        self.source = source

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            coins = self.source.uniform(self.num_samples)
            yield np.flatnonzero(coins < self.sample_rate).tolist()


class SourcedNoiseOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's DPOptimizer (flat clipping, per-sample gradients by hooks) whose noise comes from ``source``.

    ``add_noise`` is Opacus 1.6's, line for line, with ``_generate_noise`` replaced by ``source.normal``.
    """

    def __init__(self, optimizer: Optimizer, *, source: RandomSource, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
        self.source = source

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            noise = (
                torch.zeros_like(summed)
                if std == 0
                else self.source.normal(tuple(summed.shape), std=std, dtype=summed.dtype, device=summed.device)
            )
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class DpEngine(PrivacyEngine):  # type: ignore[misc]
    """``PrivacyEngine`` whose Poisson batches and Gaussian noise come from a :class:`RandomSource`.

    It overrides the two factory methods ``make_private`` calls (``_prepare_optimizer``,
    ``_prepare_data_loader``, Opacus 1.6) and supports what a site uses: one process, flat clipping,
    per-sample gradients by hooks, Poisson sampling. Anything else is refused rather than run unsourced.
    """

    def __init__(self, *, accountant: str, source: RandomSource) -> None:
        with warnings.catch_warnings():
            if source.secure:
                warnings.filterwarnings("ignore", message=OPACUS_SECURE_RNG_WARNING, category=UserWarning)
            super().__init__(accountant=accountant, secure_mode=False)
        self.source = source

    def _prepare_optimizer(  # type: ignore[override]
        self,
        *,
        optimizer: Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator: Any = None,
        grad_sample_mode: str = "hooks",
        **kwargs: Any,
    ) -> DPOptimizer:
        if distributed or clipping != "flat" or grad_sample_mode != "hooks" or noise_generator is not None:
            raise ValueError(
                "DpEngine supports one process, flat clipping and hooks, with noise from its own source; got "
                f"distributed={distributed}, clipping={clipping!r}, grad_sample_mode={grad_sample_mode!r}, "
                f"noise_generator={noise_generator!r}"
            )
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        return SourcedNoiseOptimizer(
            optimizer,
            source=self.source,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            **kwargs,
        )

    def _prepare_data_loader(  # type: ignore[override]
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        distributed: bool,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ) -> DataLoader:
        if not poisson_sampling or distributed or rand_on_empty:
            raise ValueError(
                "DpEngine samples Poisson batches in one process, empty batches left empty; got "
                f"poisson_sampling={poisson_sampling}, distributed={distributed}, rand_on_empty={rand_on_empty}"
            )
        dataset = data_loader.dataset
        num_batches = len(data_loader)
        first = dataset[0]
        return DataLoader(
            dataset,
            batch_sampler=PoissonBatchSampler(
                num_samples=len(dataset),  # type: ignore[arg-type]
                sample_rate=1.0 / num_batches,
                num_batches=num_batches,
                source=self.source,
            ),
            collate_fn=wrap_collate_with_empty(
                collate_fn=data_loader.collate_fn,
                batch_first=batch_first,
                rand_on_empty=False,
                sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                dtypes=[dtype_safe(x) for x in first],
            ),
        )
