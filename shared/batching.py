"""Batches cut to the rows they hold: rows sorted by length, so that a batch is only as wide as its longest row.

Rows are encoded padded to the run's max length, but most are shorter (the bundled reviews: ~27 tokens, of 128);
a transformer's cost grows with the width it is given. Sorting rows by length before cutting them into batches
and trimming each batch to its longest row spends the compute on tokens, not padding. Used by the local DP step
(a logical Poisson batch taken in micro-batches, :func:`micro_batches`) and by evaluation (:func:`eval_batches`,
whose results are put back in the original row order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from shared.model import Encoded


def row_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's length: one past its last attended position (0 for a row with no attended token)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.ne(0) * positions).amax(dim=1) if attention_mask.shape[0] else positions[:0]


def trim(batch: Encoded) -> Encoded:
    """The batch cut to its longest row (per-token labels too); rows padded on the right lose only padding."""
    width = max(int(row_lengths(batch.attention_mask).max()), 1) if len(batch) else 1
    labels = batch.labels[:, :width] if batch.labels.dim() == 2 else batch.labels
    return Encoded(batch.input_ids[:, :width], batch.attention_mask[:, :width], labels)


def select(data: Encoded, index: torch.Tensor) -> Encoded:
    return Encoded(data.input_ids[index], data.attention_mask[index], data.labels[index])


def longest_first(data: Encoded) -> torch.Tensor:
    """Row indices by decreasing length (ties in row order): a batch too big for memory fails on its first piece."""
    return torch.argsort(row_lengths(data.attention_mask), descending=True, stable=True)


def micro_batches(batch: Encoded, micro_batch_size: int) -> list[Encoded]:
    """A logical batch's rows sorted by length and cut into ``ceil(n / micro_batch_size)`` pieces of near-equal
    size, at most ``micro_batch_size`` rows each (0: one piece), each trimmed to its own longest row. An empty
    batch has no pieces. The order of rows inside a logical batch does not change its (sum-of-rows) step."""
    if micro_batch_size < 0:
        raise ValueError(f"micro_batch_size must be >= 0, got {micro_batch_size}")
    if len(batch) == 0:
        return []
    pieces = math.ceil(len(batch) / micro_batch_size) if micro_batch_size else 1
    return [trim(select(batch, index)) for index in torch.tensor_split(longest_first(batch), pieces)]


def eval_batches(data: Encoded, batch_size: int) -> Iterator[tuple[torch.Tensor, Encoded]]:
    """Batches of at most ``batch_size`` rows of similar length, each trimmed, with the original index of each
    row: write a batch's results at ``index`` to get them back in the original order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = longest_first(data)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        yield index, trim(select(data, index))
