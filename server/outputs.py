"""What a run leaves on disk: the PEFT adapter, the run's metrics JSON, written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "adapter-best"  # the adapter of the round with the best macro-F1 on the server's test set
METRICS_FILE = "metrics.json"
MODEL_CARD = "privatune.json"


def _non_finite(payload: Any, where: str = "$") -> str | None:
    """The JSON path of the first NaN or infinite float in ``payload``, or None."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return f"{where} = {payload}"
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file, fsync, rename: a crash leaves the old file or the new one, never half of one.

    NaN and infinity are not JSON: a payload holding one is refused, naming where, before anything is written.
    """
    bad = _non_finite(payload)
    if bad is not None:
        raise ValueError(f"{path.name}: {bad} is not a JSON number (NaN and infinity are not written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: nn.Module, run_dir: Path, *, card: dict[str, Any], name: str = ADAPTER_DIR) -> Path:
    """Save the adapter in PEFT format (adapter_config.json + adapter_model.safetensors) and a small card
    saying how to load it (base model, label names, max length) in ``run_dir / name``."""
    out = run_dir / name
    model.save_pretrained(str(out))  # type: ignore[operator]
    write_json_atomic(out / MODEL_CARD, card)
    return out
