"""What a run leaves on disk: the PEFT adapter, the run's metrics JSON, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
MODEL_CARD = "privatune.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: nn.Module, run_dir: Path, *, card: dict[str, Any]) -> Path:
    """Save the adapter in PEFT format (adapter_config.json + adapter_model.safetensors) and a small card
    saying how to load it (base model, label names, max length)."""
    out = run_dir / ADAPTER_DIR
    model.save_pretrained(str(out))  # type: ignore[operator]
    write_json_atomic(out / MODEL_CARD, card)
    return out
