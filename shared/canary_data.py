"""Canary mode of a simulation: insert the canaries into the sites' rows, score them with the final model.

The canaries and their assignment come from :func:`shared.audit.canary.make_canaries` with the run's seed, so
the server and every simulated client derive the same list without exchanging it: a client adds the canaries
assigned to its partition and drawn "in"; the server scores every canary (in or out) by how much the training
lowered its loss on its random label, and writes ``canary_scores.json`` for ``privatune audit``.

Canary mode is for simulations only: it deliberately adds records to a site's data (which gives the data set
a new fingerprint, so its budget is accounted apart from the site's real data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.audit.canary import Canary, make_canaries, site_canary_rows

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
        labels=np.concatenate(
            [rows.labels, np.asarray([label for _, label in extra], dtype=rows.labels.dtype)]
        ),
        label_names=rows.label_names,
        source=f"{rows.source} + {len(extra)} canaries",
    )


def per_example_losses(model: Any, data: Any, *, device: str = "cpu", batch_size: int = 128) -> np.ndarray:
    """Cross-entropy of ``model`` on each encoded row (``shared.model.Encoded``), in order."""
    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss(reduction="none")
    was_training = model.training
    model.to(device)
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                mask = data.attention_mask[start : start + batch_size]
                width = max(int(mask.sum(dim=1).max().item()), 1)
                ids = data.input_ids[start : start + batch_size, :width].to(device)
                logits = model(input_ids=ids, attention_mask=mask[:, :width].to(device)).logits
                out.append(loss_fn(logits, data.labels[start : start + batch_size].to(device)).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)


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
            f"need one loss before and after per canary, got {len(canaries)}, {len(losses_before)}, "
            f"{len(losses_after)}"
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
