"""Classification metrics (loss, accuracy, macro precision / recall / F1, each label's recall, the majority-class
baseline, the share of the most-predicted class, the confusion matrix), the warnings about a model's metrics, and
batched evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, *, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 (a class never predicted has precision 0)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equal, non-empty label arrays, got {y_true.shape} and {y_pred.shape}")
    precision, recall, f1 = [], [], []
    for c in range(num_classes):
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    counts = np.bincount(y_pred, minlength=num_classes)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "top_class": int(np.argmax(counts)),  # the class predicted most often
        "top_class_share": float(counts.max() / y_pred.size),  # 1.0: the model predicts one class for every row
    }


def majority_baseline(y_true: np.ndarray, *, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent class of ``y_true``: what a model must
    beat to have learned anything."""
    y_true = np.asarray(y_true)
    majority = int(np.argmax(np.bincount(y_true, minlength=num_classes)))
    scores = classification_metrics(y_true, np.full_like(y_true, majority), num_classes=num_classes)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "class": majority}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``m[i, j]``: rows of true class i predicted as class j."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def class_recall(y_true: np.ndarray, y_pred: np.ndarray, *, label_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per label, by name in index order: ``rows``, the test rows that have it; ``found``, how many of those the
    model gave it; ``recall``, their share (0.0 for a label with no rows). What macro recall averages away: a model
    that finds 77 of 342 rows of one label and nearly every row of the other."""
    m = confusion_matrix(y_true, y_pred, num_classes=len(label_names))
    out = {}
    for c, name in enumerate(label_names):
        rows, found = int(m[c].sum()), int(m[c, c])
        out[str(name)] = {"rows": rows, "found": found, "recall": found / rows if rows else 0.0}
    return out


ONE_CLASS_SHARE = 0.95  # a model that gives one class to this share of the test rows or more is warned about
# A label is "rarely found" when its recall is under LOW_RECALL_RATIO times the best label's recall: the model finds
# its rows less than half as often as it finds the best label's, whatever the number of labels (a fixed floor would
# flag a fair 10-label model, and 1/k chance differs with k). Only labels with LOW_RECALL_MIN_ROWS test rows or more
# are judged (and only they can be the best): the recall of 10 rows moves by 0.1 with one row.
LOW_RECALL_RATIO = 0.5
LOW_RECALL_MIN_ROWS = 20
LOW_RECALL_ADVICE = (
    "try more rounds, more rows per site, or a larger max-length if the texts are long; "
    "simulations/linear_probe.py tells whether the encoder separates these labels at all"
)


def rarely_found(per_class: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], str | None]:
    """The labels whose recall is under ``LOW_RECALL_RATIO`` times the best label's (each with at least
    ``LOW_RECALL_MIN_ROWS`` test rows), worst first, and that best label (None when fewer than two labels have
    enough rows)."""
    judged = {name: c for name, c in per_class.items() if int(c["rows"]) >= LOW_RECALL_MIN_ROWS}
    if len(judged) < 2:
        return [], None
    best = max(judged, key=lambda name: float(judged[name]["recall"]))
    top = float(judged[best]["recall"])
    low = [name for name, c in judged.items() if float(c["recall"]) < LOW_RECALL_RATIO * top]
    return sorted(low, key=lambda name: float(judged[name]["recall"])), best


def recall_warning(test: Mapping[str, Any], label_names: Sequence[str]) -> str | None:
    """The warning about labels the model rarely finds (:func:`rarely_found` on ``test["per_class"]``), naming
    each with its recall and how many of its rows were found, the best label, the most-predicted label where the
    one-class warning does not already, and what to try; None when no label is rarely found."""
    per_class = test.get("per_class")
    if not isinstance(per_class, Mapping):
        return None
    low, best = rarely_found(per_class)
    if not low or best is None:
        return None
    found = " and ".join(
        f"{per_class[n]['found']} of {per_class[n]['rows']} {n!r} rows (recall {float(per_class[n]['recall']):.4f})"
        for n in low
    )
    text = f"finds only {found}, against recall {float(per_class[best]['recall']):.4f} for {best!r}"
    share, top = float(test.get("top_class_share", 0.0)), int(test.get("top_class", -1))
    if 0 <= top < len(label_names) and share < ONE_CLASS_SHARE:
        text += f", and predicts {label_names[top]!r} for {share:.1%} of the test rows"
    return f"{text}: {LOW_RECALL_ADVICE}"


def quality_warnings(
    test: Mapping[str, Any], baseline: Mapping[str, Any] | None, label_names: Sequence[str]
) -> list[str]:
    """Loud, one-line warnings about a model's test metrics: it predicts (nearly) one class, it rarely finds some
    label (:func:`recall_warning`, where ``test`` has ``per_class``), or it does worse than always predicting the
    majority class (``baseline``; None where it was not recorded). Empty when none holds."""
    out = []
    share = float(test.get("top_class_share", 0.0))
    if share >= ONE_CLASS_SHARE:
        name = label_names[int(test["top_class"])] if "top_class" in test else "?"
        out.append(f"predicts {name!r} for {share:.0%} of the test rows")
    recall = recall_warning(test, label_names)
    if recall is not None:
        out.append(recall)
    if baseline is not None and test["accuracy"] < baseline["accuracy"] - 1e-9:
        out.append(f"accuracy {test['accuracy']:.4f} is below the majority baseline {baseline['accuracy']:.4f}")
    return out


DIVERGED_LOSS_RATIO = 1.5  # a test loss this many times the untrained model's is a run that is diverging


def divergence_warnings(test: dict[str, Any], initial: dict[str, Any]) -> list[str]:
    """A warning when the model's held-out loss is not finite or has risen to ``DIVERGED_LOSS_RATIO`` times the
    untrained model's (round 0): the steps are too large for the noise and the data, and every further round
    spends budget on a worse model. For every task (both report ``loss``); empty otherwise."""
    loss, start = float(test.get("loss", math.nan)), float(initial.get("loss", math.nan))
    if not math.isfinite(loss) and "loss" in test:
        return [f"has a test loss of {loss}: the run has diverged (try a lower learning-rate)"]
    if math.isfinite(start) and start > 0 and loss > DIVERGED_LOSS_RATIO * start:
        return [
            f"has a test loss of {loss:.4f}, {loss / start:.1f}x the untrained model's {start:.4f}: the run is "
            "diverging (try a lower learning-rate)"
        ]
    return []


@torch.no_grad()
def predict(model: nn.Module, data: Any, *, device: str = "cpu", batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Logits-argmax predictions (in row order) and mean cross-entropy of ``model`` on encoded rows, computed in
    batches of rows of similar length (:func:`shared.batching.eval_batches`)."""
    from shared.batching import eval_batches

    model.to(device)
    was_training = model.training
    model.eval()
    preds = np.zeros(len(data), dtype=np.int64)
    loss_sum = 0.0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    try:
        for index, batch in eval_batches(data, batch_size):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            loss_sum += float(loss_fn(logits.float(), batch.labels.to(device)))
            preds[index.numpy()] = logits.argmax(dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    return preds, loss_sum / len(data)


def evaluate_model(
    model: nn.Module, data: Any, *, num_classes: int, label_names: Sequence[str] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Loss and :func:`classification_metrics` of ``model`` on encoded rows; with ``label_names`` (one per class)
    also ``per_class``, each label's :func:`class_recall`."""
    preds, loss = predict(model, data, device=device)
    y_true = data.labels.numpy()
    metrics: dict[str, Any] = {"loss": loss, **classification_metrics(y_true, preds, num_classes=num_classes)}
    if label_names is not None:
        if len(label_names) != num_classes:
            raise ValueError(f"label_names must name the {num_classes} classes, got {list(label_names)}")
        metrics["per_class"] = class_recall(y_true, preds, label_names=label_names)
    return metrics
