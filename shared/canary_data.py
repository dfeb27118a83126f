"""Canary mode with text canaries (``canary-kind = "text"``): insert them into the sites' rows, score them with
the final model. The default, gradient canaries, is :mod:`shared.gradient_canaries`.

The canaries and their assignment come from :func:`shared.audit.canary.make_canaries` with the run's seed, so
the server and every simulated client derive the same list without exchanging it: a client adds the canaries
assigned to its partition and drawn "in"; the server scores every canary (in or out) by how much the training
lowered its loss on its random label, and writes ``canary_scores.json`` for ``privatune audit``.

Canary mode is for simulations only: it deliberately adds records to a site's data (which gives the rows a
new fingerprint, but not a new budget: the rounds compose with the site's data source like any other).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.audit.canary import Canary, CanaryError, make_canaries, site_canary_rows
from shared.identity import site_id_for_partition
from shared.site import Site

CANARY_FILE = "canary_scores.json"


def run_canaries(*, canaries: int, seed: int, num_sites: int, num_labels: int) -> list[Canary]:
    """The run's canaries (empty when ``canaries`` is 0): the same list on the server and on every client."""
    if canaries == 0:
        return []
    return make_canaries(canaries, num_sites=num_sites, num_labels=num_labels, seed=seed)


def with_site_canaries(rows: Any, canaries: Sequence[Canary], *, partition_id: int) -> Any:
    """``rows`` (a :class:`shared.data.LabelledText`) with this site's included canaries appended."""
    extra = site_canary_rows(canaries, partition_id)
    if not extra:
        return rows
    return type(rows)(
        texts=(*rows.texts, *(t for t, _ in extra)),
        labels=np.concatenate([rows.labels, np.asarray([label for _, label in extra], dtype=rows.labels.dtype)]),
        label_names=rows.label_names,
        source=f"{rows.source} + {len(extra)} canaries",
    )


def add_site_canaries(rows: Any, *, canaries: int, seed: int, site: Site) -> Any:
    """The client's one call: ``rows`` plus the canaries of this simulated site (``rows`` when none)."""
    if canaries == 0:
        return rows
    if not site.simulated or site.partition_id is None or not site.num_partitions:
        raise CanaryError(f"canary mode is for simulations only; site {site.site_id!r} is a deployed site")
    run = run_canaries(canaries=canaries, seed=seed, num_sites=site.num_partitions, num_labels=len(rows.label_names))
    return with_site_canaries(rows, run, partition_id=site.partition_id)


def per_example_losses(model: Any, data: Any, *, device: str = "cpu", batch_size: int = 128) -> np.ndarray:
    """Cross-entropy of ``model`` on each encoded row (``shared.model.Encoded``), in order."""
    import torch
    from torch import nn

    from shared.batching import eval_batches

    loss_fn = nn.CrossEntropyLoss(reduction="none")
    was_training = model.training
    model.to(device)
    model.eval()
    out = np.zeros(len(data), dtype=np.float64)
    try:
        with torch.no_grad():
            for index, batch in eval_batches(data, batch_size):  # rows of similar length, put back in order
                logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                out[index.numpy()] = loss_fn(logits.logits.float(), batch.labels.to(device)).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def write_canary_scores(
    run_dir: Path,
    *,
    run_id: str,
    seed: int,
    canaries: Sequence[Canary],
    losses_before: np.ndarray,
    losses_after: np.ndarray,
    site_ids: Sequence[str],
    delta: float | None = None,
) -> Path:
    """Write ``canary_scores.json``: per canary its site, whether it was inserted, and its score (the drop
    of its loss from the initial to the final global model: higher looks more like a training member)."""
    if not len(canaries) == len(losses_before) == len(losses_after):
        raise ValueError(
            f"need one loss before and after per canary, got {len(canaries)}, {len(losses_before)}, {len(losses_after)}"
        )
    payload = {
        "run_id": run_id,
        "seed": seed,
        "delta": delta,
        "score": "loss before training - loss after training, on the canary's random label",
        "canaries": [
            {
                "index": c.index,
                "site": site_ids[c.site],
                "included": c.included,
                "score": float(before - after),
                "loss_before": float(before),
                "loss_after": float(after),
            }
            for c, before, after in zip(canaries, losses_before, losses_after, strict=True)
        ],
    }
    path = Path(run_dir) / CANARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@dataclass
class CanaryScorer:
    """The server's side: losses of every canary under the initial model, then under the final one."""

    canaries: list[Canary]
    encoded: Any
    losses_before: np.ndarray
    num_sites: int

    @classmethod
    def start(
        cls,
        model: Any,
        encode_rows: Callable[[list[str], np.ndarray], Any],
        *,
        canaries: int,
        seed: int,
        num_sites: int,
        num_labels: int,
        device: str = "cpu",
    ) -> CanaryScorer | None:
        """Draw the run's canaries and score them with the initial model; None when canaries is 0."""
        run = run_canaries(canaries=canaries, seed=seed, num_sites=num_sites, num_labels=num_labels)
        if not run:
            return None
        encoded = encode_rows([c.text for c in run], np.asarray([c.label for c in run], dtype=np.int64))
        return cls(run, encoded, per_example_losses(model, encoded, device=device), num_sites)

    def finish(self, model: Any, run_dir: Path, *, run_id: str, seed: int, delta: float, device: str = "cpu") -> Path:
        """Score the canaries with the final model and write ``canary_scores.json`` into ``run_dir``."""
        return write_canary_scores(
            run_dir,
            run_id=run_id,
            seed=seed,
            canaries=self.canaries,
            losses_before=self.losses_before,
            losses_after=per_example_losses(model, self.encoded, device=device),
            site_ids=[site_id_for_partition(i) for i in range(self.num_sites)],
            delta=delta,
        )
