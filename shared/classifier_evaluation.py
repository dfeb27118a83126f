"""``privatune evaluate`` of a classifier's adapter: its metrics and each label's recall on a labelled file, next to
the majority-class baseline, with the warnings a run gives about its model (one label, a label rarely found, below
the baseline). The entry for every task is :mod:`shared.evaluation`.

The predictions come from :class:`shared.predict.Classifier`, the same function ``privatune predict`` and the
service call, so the numbers here are the numbers a user of the adapter gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.data import DataError, load_labelled_text
from shared.metrics import (
    class_recall,
    classification_metrics,
    confusion_matrix,
    majority_baseline,
    quality_warnings,
)
from shared.predict import load_classifier
from shared.tasks.presets import CLASSIFY


@dataclass(frozen=True)
class ClassifierEvaluation:
    """A classifier's adapter on a labelled file (a :class:`shared.tasks.base.AdapterEvaluation`)."""

    adapter_dir: str
    data: str
    rows: int
    label_names: tuple[str, ...]
    metrics: dict[str, Any]  # classification_metrics, and per_class: each label's rows, found and recall
    majority: dict[str, float]
    confusion: list[list[int]]  # confusion[i][j]: rows of true label i predicted as label j
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter_dir,
            "task": CLASSIFY,
            "data": self.data,
            "rows": self.rows,
            "label_names": list(self.label_names),
            "metrics": self.metrics,
            "majority_baseline": self.majority,
            "confusion_matrix": self.confusion,
            "warnings": self.warnings,
        }

    def report(self) -> str:
        m, b = self.metrics, self.majority
        lines = [
            f"adapter {self.adapter_dir} on {self.data} ({self.rows} rows)",
            f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  precision {m['precision']:.4f}  "
            f"recall {m['recall']:.4f}",
            f"majority baseline (always {self.label_names[int(b['class'])]!r}): accuracy {b['accuracy']:.4f}  "
            f"macro-F1 {b['macro_f1']:.4f}",
            "confusion matrix (rows: true label, columns: predicted):",
        ]
        width = max(8, *(len(n) for n in self.label_names))
        lines.append(" " * width + "  " + "  ".join(f"{n:>{width}}" for n in self.label_names))
        for name, row in zip(self.label_names, self.confusion, strict=True):
            lines.append(f"{name:>{width}}  " + "  ".join(f"{v:>{width}d}" for v in row))
        majority = self.label_names[int(b["class"])]
        lines.append(f"recall per label (the majority baseline finds every {majority!r} row and no other):")
        for name, c in m["per_class"].items():
            lines.append(f"{name:>{width}}  {c['recall']:.4f}  ({c['found']} of {c['rows']})")
        lines += [f"WARNING: the model {w}" for w in self.warnings]
        return "\n".join(lines)


def evaluate_classifier(
    adapter_dir: str | Path,
    data_path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    base_model: str | None = None,
    max_rows: int | None = None,
) -> ClassifierEvaluation:
    """Predict every row of ``data_path`` (the first ``max_rows``) with the adapter and score it against the file's
    labels, which must be among the adapter's label names (its card)."""
    classifier = load_classifier(adapter_dir, base_model=base_model)
    names = classifier.label_names
    data = load_labelled_text(data_path, text_column=text_column, label_column=label_column, labels=None)
    unknown = sorted(set(data.label_names) - set(names))
    if unknown:
        raise DataError(f"{data.source}: label(s) {unknown} are not the adapter's labels {list(names)}")
    index = {n: i for i, n in enumerate(names)}
    y_true = np.asarray([index[data.label_names[k]] for k in data.labels], dtype=np.int64)
    texts = list(data.texts)
    if max_rows is not None:
        texts, y_true = texts[:max_rows], y_true[:max_rows]
    y_pred = np.asarray([p["index"] for p in classifier.predict(texts)], dtype=np.int64)
    metrics: dict[str, Any] = classification_metrics(y_true, y_pred, num_classes=len(names))
    metrics["per_class"] = class_recall(y_true, y_pred, label_names=names)
    majority = majority_baseline(y_true, num_classes=len(names))
    return ClassifierEvaluation(
        adapter_dir=str(classifier.adapter_dir),
        data=data.source,
        rows=len(texts),
        label_names=tuple(names),
        metrics=metrics,
        majority=majority,
        confusion=confusion_matrix(y_true, y_pred, num_classes=len(names)).tolist(),
        warnings=quality_warnings(metrics, majority, list(names)),
    )
