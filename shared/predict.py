"""Predictions of a saved adapter: what ``privatune predict`` prints and ``privatune serve`` answers.

An adapter directory is what a run leaves in ``runs/run-<id>/adapter/``: a plain PEFT adapter and the card
``privatune.json`` (base model, head pooling, label names, token limit). :func:`load_classifier` reads both
and :meth:`Classifier.predict` is the one prediction function both commands call, so the service answers
exactly what the command line does.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from server.outputs import MODEL_CARD
from shared.tasks.presets import CLASSIFY, TASK_NAMES

ADAPTER_CONFIG = "adapter_config.json"
PREDICT_BATCH = 64  # rows per forward pass


class AdapterError(ValueError):
    """An adapter directory that is missing, incomplete, or whose card is not what a run writes."""


@dataclass(frozen=True)
class AdapterCard:
    """How to load an adapter: the fields of ``privatune.json`` that prediction needs."""

    base_model: str
    classifier_pooling: str
    label_names: tuple[str, ...]
    max_length: int

    @classmethod
    def from_dict(cls, card: Mapping[str, Any], *, source: str) -> AdapterCard:
        def need(key: str, ok: bool, what: str) -> None:
            if not ok:
                raise AdapterError(f"{source}: {key} must be {what}, got {card.get(key)!r}")

        base, pooling = card.get("base_model"), card.get("classifier_pooling")
        labels, max_length = card.get("label_names"), card.get("max_length")
        need("base_model", isinstance(base, str) and bool(base), "a model path")
        need("classifier_pooling", pooling in ("mean", "cls"), "'mean' or 'cls'")
        need(
            "label_names",
            isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels),
            "a list of two or more label names",
        )
        need("label_names", len(set(labels)) == len(labels), "distinct names")  # type: ignore[arg-type]
        need(
            "max_length",
            isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 1,
            "a positive integer",
        )
        return cls(str(base), str(pooling), tuple(labels), int(max_length))  # type: ignore[arg-type]


def check_adapter_dir(adapter_dir: Path) -> Path:
    """``adapter_dir`` as a path, once it is a directory holding both files a run writes there (the PEFT adapter's
    config and the card); an :class:`AdapterError` naming what is missing otherwise, and which directory to give
    where it is a run's directory or an adapter's ``merged/`` export."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    for name in (ADAPTER_CONFIG, MODEL_CARD):
        if not (adapter_dir / name).is_file():
            raise AdapterError(
                f"{adapter_dir} has no {name}: not an adapter directory a PrivaTune run wrote{_which_dir(adapter_dir)}"
            )
    return adapter_dir


def _which_dir(directory: Path) -> str:
    """The adapter directory a user probably meant, for an error about ``directory`` ("" when there is no guess)."""
    adapters = [
        str(directory / name) for name in ("adapter", "adapter-best") if (directory / name / MODEL_CARD).is_file()
    ]
    if adapters:
        return f" (a run's directory: give {' or '.join(adapters)})"
    if (directory.parent / MODEL_CARD).is_file():
        return f" (inside an adapter, e.g. its merged/ export: give {directory.parent})"
    return " (give runs/run-<id>/adapter or adapter-best)"


def adapter_task_name(adapter_dir: Path) -> str:
    """The task an adapter directory was trained for: its card's ``task`` (``classify`` where the card has none: a
    classifier's cards named no task before the causal LM was added); an :class:`AdapterError` for anything else."""
    path = check_adapter_dir(adapter_dir) / MODEL_CARD
    task = read_json_object(path).get("task", CLASSIFY)
    if task not in TASK_NAMES:
        raise AdapterError(f"{path}: task must be one of {list(TASK_NAMES)}, got {task!r}")
    return str(task)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; an :class:`AdapterError` naming the file if it is unreadable, not JSON, or
    not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(value, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return value


def read_card(adapter_dir: Path) -> AdapterCard:
    """A classifier's card; an :class:`AdapterError` naming what to use for another task's adapter."""
    path = check_adapter_dir(adapter_dir) / MODEL_CARD
    task = adapter_task_name(adapter_dir)
    if task != CLASSIFY:
        raise AdapterError(
            f"{adapter_dir} is a {task!r} adapter (its {MODEL_CARD}), not a classifier's: privatune predict and serve "
            f"take a classifier's adapter; use privatune generate --adapter {adapter_dir} --prompt TEXT for its text "
            f"and privatune evaluate --adapter {adapter_dir} --data FILE for its metrics on a file"
        )
    return AdapterCard.from_dict(read_json_object(path), source=str(path))


class Classifier:
    """A loaded adapter on its base model, in eval mode. ``predict`` is safe to call from several threads
    (one forward pass at a time: torch already spreads one pass over the cores)."""

    def __init__(self, model: nn.Module, tokenizer: Any, card: AdapterCard, adapter_dir: Path) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.card = card
        self.adapter_dir = adapter_dir
        self._lock = threading.Lock()

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.card.label_names

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One ``{"label", "index", "scores": {label: probability}}`` per text, in order."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings")
        probabilities = np.zeros((0, len(self.label_names)), dtype=np.float32)
        with self._lock, torch.no_grad():
            parts = [probabilities]
            for start in range(0, len(texts), PREDICT_BATCH):
                batch = self.tokenizer(
                    list(texts[start : start + PREDICT_BATCH]),
                    padding=True,
                    truncation=True,
                    max_length=self.card.max_length,
                    return_tensors="pt",
                )
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                parts.append(torch.softmax(logits.float(), dim=-1).numpy())
            probabilities = np.concatenate(parts)
        out = []
        for row in probabilities:
            index = int(np.argmax(row))
            out.append(
                {
                    "label": self.label_names[index],
                    "index": index,
                    "scores": {name: float(p) for name, p in zip(self.label_names, row, strict=True)},
                }
            )
        return out


def load_classifier(adapter_dir: str | Path, *, base_model: str | None = None) -> Classifier:
    """The adapter of ``adapter_dir`` on the base model its card names (or ``base_model``, e.g. where the
    model lives on this machine). Never downloads."""
    from peft import PeftModel

    from shared.model import load_base_model, load_tokenizer

    path = Path(adapter_dir).expanduser()
    card = read_card(path)
    if base_model:
        card = AdapterCard(base_model, card.classifier_pooling, card.label_names, card.max_length)
    base = load_base_model(card.base_model, num_labels=len(card.label_names), pooling=card.classifier_pooling)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            model = PeftModel.from_pretrained(base, str(path))
        except (ValueError, RuntimeError, KeyError) as e:
            raise AdapterError(f"{path} does not apply to base model {card.base_model!r}: {e}") from e
    return Classifier(model, load_tokenizer(card.base_model), card, path)
