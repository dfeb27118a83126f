"""Local training of the adapter on a site's rows: Opacus DP-SGD (Poisson sampling, per-sample clipping), and
the site's answer to the feature-centering query.

One call trains one round. The round's privacy cost is returned as a :class:`shared.privacy.DpEvent`; the
site's cumulative epsilon is composed from all its events elsewhere (``shared/privacy.py``, the ledger), so a
fresh PrivacyEngine per round never resets it.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.canary_rows import CanaryRows
from client.dp_random import DpEngine, random_source
from shared.batching import micro_batches
from shared.centering import ANSWER_SCALE, sensitivity
from shared.model import Encoded, classifier_loss
from shared.privacy import DpEvent

if TYPE_CHECKING:
    from shared.tasks.base import LossFn


def _stack_collate(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """A logical batch as whole tensors; :func:`micro_batches` sorts, splits and trims it."""
    return tuple(torch.stack(col) for col in zip(*rows, strict=True))


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float | None  # mean loss of the batches that drew rows; None when every batch was empty
    steps: int
    empty_batches: int  # Poisson batches that drew no row (still noisy, accounted steps)
    event: DpEvent | None  # None when DP is off
    canary_update: np.ndarray | None = None  # canary mode: the change of the site's canaries' audit coordinates


def _batches(loader: DataLoader) -> Iterator[Encoded]:
    while True:
        for input_ids, attention_mask, labels in loader:
            yield Encoded(input_ids, attention_mask, labels)


def _event_from_opacus(history: list[tuple[float, float, int]], *, max_grad_norm: float) -> DpEvent:
    """The round's DP event as Opacus's own accountant recorded it (one mechanism: one history entry)."""
    if len(history) != 1:
        raise RuntimeError(f"expected one (noise, sample rate, steps) entry in Opacus's accountant, got {history}")
    noise_multiplier, sample_rate, num_steps = history[0]
    return DpEvent(
        sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier),
        steps=int(num_steps),
        clip_norm=float(max_grad_norm),
    )


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere autocast bf16 is emulated
    and slower than float32. Linux's /proc/cpuinfo; False where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_autocast(mode: str, device: str) -> str:
    """``"off"`` or ``"bf16"``: ``"auto"`` is bf16 where ``device`` computes it natively (a CUDA GPU that supports
    bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere."""
    if mode in ("off", "bf16"):
        return mode
    if mode != "auto":
        raise ValueError(f"autocast must be 'off', 'bf16' or 'auto', got {mode!r}")
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "off"
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "off"


def _autocast(mode: str, device: str) -> contextlib.AbstractContextManager[object]:
    if mode == "off":
        return contextlib.nullcontext()
    if mode == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"autocast must be 'off' or 'bf16', got {mode!r}")


def _per_sample_grads_in_param_dtype(params: list[nn.Parameter]) -> None:
    """Under autocast Opacus's hooks compute per-sample gradients in bf16. Opacus would take their norms in bf16
    (rounded down by up to 0.4%, so a clipped gradient could exceed the clip norm) and cast only the sum: cast
    them to the parameter's dtype first, so the norm is taken, and the clipping holds, on the values summed."""
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor) and grad_sample.dtype != p.dtype:
            p.grad_sample = grad_sample.to(p.dtype)  # type: ignore[attr-defined]


def _backward(loss: torch.Tensor) -> None:
    with warnings.catch_warnings():  # Opacus's hooks on a module whose inputs need no grad: expected
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        loss.backward()


def logical_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Encoded,
    params: list[nn.Parameter],
    *,
    loss_fn: LossFn,
    micro_batch_size: int,
    dp: bool,
    device: str,
    autocast: str,
    canaries: CanaryRows | None = None,
) -> float | None:
    """One optimizer step on a logical batch, taken in micro-batches; returns the batch's mean loss (None if empty).

    Under DP this is Opacus's BatchMemoryManager protocol: every micro-batch but the last is a skipped step
    (``signal_skip_step(True)``: its per-sample gradients are clipped and summed into ``summed_grad``, then
    freed); the last one adds the noise once, divides by the expected batch size and steps. Since each row's
    gradient is clipped on its own, the step equals the step on the whole batch while memory holds one
    micro-batch. Without DP each micro-batch's mean loss is weighted by its share of the rows, so the accumulated
    gradient is the whole batch's mean-loss gradient. Canary mode's drawn canaries (``canaries``) are one more
    skipped micro-step, first (:mod:`client.canary_rows`).
    """
    optimizer.zero_grad(set_to_none=True)
    if canaries is not None:
        canaries.insert(optimizer, params)
    pieces = micro_batches(batch, micro_batch_size)
    if not pieces:
        # An empty Poisson batch is still a DP step (noise only): zero per-sample gradients for it.
        for p in params if dp else []:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        if canaries is not None:
            canaries.no_rows(0)
        optimizer.step()
        return None
    loss_sum = 0.0
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        piece = Encoded(piece.input_ids.to(device), piece.attention_mask.to(device), piece.labels.to(device))
        with _autocast(autocast, device):
            loss = loss_fn(module, piece)
        loss_sum += float(loss.detach()) * len(piece)
        if dp:
            _backward(loss)  # the micro-batch's mean: Opacus's per-sample gradients are each row's own
            _per_sample_grads_in_param_dtype(params)
            if canaries is not None:
                canaries.no_rows(len(piece))
            optimizer.signal_skip_step(do_skip=not last)  # type: ignore[attr-defined]
            optimizer.step()
            if not last:
                optimizer.zero_grad(set_to_none=True)  # frees the per-sample gradients, keeps the clipped sum
        else:
            _backward(loss * (len(piece) / len(batch)))
    if not dp:
        optimizer.step()
    return loss_sum / len(batch)


def _run_steps(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Encoded],
    params: list[nn.Parameter],
    *,
    steps: int,
    **step_options: Any,
) -> tuple[list[float], int]:
    """Take ``steps`` optimizer steps; returns the batch losses and the number of empty (Poisson) batches."""
    losses: list[float] = []
    empty = 0
    for _ in range(steps):
        loss = logical_step(module, optimizer, next(batches), params, **step_options)
        if loss is None:
            empty += 1
        else:
            losses.append(loss)
    return losses, empty


def make_optimizer(name: str, params: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """A fresh local optimizer per round (its state is local and never leaves the site)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def train_round(
    model: nn.Module,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    dp: bool,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    device: str = "cpu",
    optimizer_name: str = "adam",
    loss_fn: LossFn | None = None,
    micro_batch_size: int = 0,
    autocast: str = "off",
    canaries: np.ndarray | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps on ``data``; with ``dp`` they are DP-SGD steps under Opacus.

    With DP, each record enters each batch independently with probability ``batch_size / len(data)``
    (Poisson sampling), every per-sample gradient is clipped to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` is added to their sum. The coins and the noise come from the OS's CSPRNG
    (:mod:`client.dp_random`); with a ``seed`` (reproducible-noise, experiments only) from a seeded generator.
    A batch that draws no row is still a step (noise only); ``mean_loss`` averages the batches that drew rows.

    ``loss_fn`` is the task's loss (:data:`shared.tasks.base.LossFn`; None: the classifier's cross-entropy).
    Each logical batch is sorted by row length and taken in micro-batches of at most ``micro_batch_size`` rows
    (0: the whole batch at once), each trimmed to its longest row; the step is the whole batch's step (see
    :func:`logical_step`) and ``steps`` counts logical steps, as the accountant does. ``autocast="bf16"`` runs
    the forward pass under ``torch.autocast`` in bfloat16 (``"auto"``: where the device does bf16 natively,
    :func:`resolve_autocast`); the adapter weights, their gradients, the clipping,
    the noise and the optimizer stay in float32.

    ``canaries`` (canary mode, DP only): which of the site's gradient canaries are inserted
    (:mod:`shared.gradient_canaries`); each is drawn into every step with the step's sample rate, and
    ``canary_update`` is the change of their audit coordinates.
    """
    if len(data) == 0:
        raise ValueError("cannot train on 0 rows")
    if canaries is not None and not dp:
        raise ValueError("gradient canaries audit DP-SGD: they need dp = true")
    if micro_batch_size < 0:
        raise ValueError(f"micro_batch_size must be >= 0, got {micro_batch_size}")
    autocast = resolve_autocast(autocast, device)  # an unknown mode fails before any work
    model.to(device)
    model.train()  # HF models load in eval mode; Opacus must wrap a model in train mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, params, learning_rate)
    dataset = TensorDataset(data.input_ids, data.attention_mask, data.labels)
    reproducible = seed is not None
    if seed is None:
        seed = secrets.randbits(62)  # shuffling of a non-private round and dropout: not part of any DP claim
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(data)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_stack_collate,
    )
    engine_module: nn.Module = model
    event: DpEvent | None = None
    rows: CanaryRows | None = None
    if dp:
        # Poisson batches and noise from the OS's CSPRNG, or (reproducible-noise) from a generator seeded by seed + 1
        engine = DpEngine(accountant="prv", source=random_source(seed + 1 if reproducible else None))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            engine_module, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
            )
        if canaries is not None:  # drawn at the loader's own rate, with coins from the same source
            rows = CanaryRows(canaries, clip_norm=max_grad_norm, sample_rate=1.0 / len(loader), source=engine.source)
            rows.attach(optimizer)  # type: ignore[arg-type]
    batches = _batches(loader)
    try:
        # dropout draws from torch's global generator: pin it for a reproducible round, then restore it
        with torch.random.fork_rng(devices=[]) if reproducible else contextlib.nullcontext():
            if reproducible:
                torch.manual_seed(seed)
            losses, empty = _run_steps(
                engine_module,
                optimizer,
                batches,
                params,
                steps=steps,
                loss_fn=classifier_loss if loss_fn is None else loss_fn,
                micro_batch_size=micro_batch_size,
                dp=dp,
                device=device,
                autocast=autocast,
                canaries=rows,
            )
    finally:
        if dp:
            engine_module._close()  # type: ignore[operator]  # remove Opacus hooks: the model is plain again
    if dp:
        event = _event_from_opacus(engine.accountant.history, max_grad_norm=max_grad_norm)
    mean_loss = float(np.mean(losses)) if losses else None  # all batches empty: there is no loss to average
    return TrainResult(
        mean_loss=mean_loss,
        steps=steps,
        empty_batches=empty,
        event=event,
        canary_update=rows.update() if rows is not None else None,
    )


def noisy_feature_sum(
    model: nn.Module,
    data: Encoded,
    *,
    clip_norm: float,
    noise_multiplier: float,
    seed: int | None,
    device: str = "cpu",
) -> np.ndarray:
    """The site's answer to the centering query (:mod:`shared.centering`): the Gaussian mechanism on the sum of
    its rows' vectors ``(clip(x_i), clip_norm)``, divided by the public :data:`shared.centering.ANSWER_SCALE`.

    Each row's pooled vector (the head's input, :func:`shared.model.pooled_features`) is clipped to L2 norm
    ``clip_norm`` and extended by the coordinate ``clip_norm``, so adding or removing a row moves the sum by at most
    ``sqrt(2) clip_norm``; Gaussian noise of std ``noise_multiplier * sqrt(2) clip_norm`` is added to every
    coordinate. Nothing is divided by the row count: the last coordinate is the noisy count (times
    ``clip_norm``). Returns a float64 vector of length hidden size + 1.
    """
    from shared.model import pooled_features

    if len(data) == 0:
        raise ValueError("cannot answer the centering query with 0 rows")
    features = pooled_features(model, data, device=device).double()
    scale = torch.clamp(clip_norm / features.norm(dim=1, keepdim=True).clamp(min=1e-12), max=1.0)
    rows = torch.cat([features * scale, torch.full((len(data), 1), clip_norm, dtype=features.dtype)], dim=1)
    total = rows.sum(dim=0)
    noise = random_source(seed).normal(
        tuple(total.shape), std=noise_multiplier * sensitivity(clip_norm), dtype=total.dtype, device="cpu"
    )
    return ((total + noise) / ANSWER_SCALE).numpy()
