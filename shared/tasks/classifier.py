"""The text classifier: labelled rows, a LoRA sentence encoder with a classification head, cross-entropy.

Today's (and the default) task. Rows are (text, label) from ``data-path`` (``builtin:rotten-tomatoes`` or a
labelled CSV / JSONL / Parquet file, :mod:`shared.data`); the model is :func:`shared.model.build_model` with one
output per label; the server's evaluation is accuracy, macro-F1 and each label's recall on its held-out rows next
to the majority class (the reference a model must beat), with a warning for a label the model rarely finds; the
best round is the one with the highest macro-F1. It has all three
optional capabilities (:mod:`shared.tasks.base`): feature centering, the canary audit and the sites' noisy
confusion matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shared.tasks.base import Metrics
from shared.tasks.presets import CLASSIFY, TASK_PRESETS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.classifier_evaluation import ClassifierEvaluation
    from shared.config import RunConfig
    from shared.data import LabelledText
    from shared.model import Encoded
    from shared.privacy import DpEvent
    from shared.site import Site
    from shared.tasks.base import CanaryScoring, Rows

# torch and transformers are imported inside the methods: get_task("classify") must stay cheap to call.


def _labelled(rows: Rows) -> LabelledText:
    from shared.data import LabelledText

    if not isinstance(rows, LabelledText):
        raise TypeError(f"the classifier's rows are LabelledText, got {type(rows).__name__}")
    return rows


def _label_names(model: nn.Module) -> list[str]:
    """The label names :meth:`ClassifierTask.fresh_model` wrote into the model's config (``id2label``)."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)]


class MeanFeatureCentering:
    """The classifier's feature centering (mean pooling only): the head's input minus a DP estimate of the
    sites' mean pooled vector (:mod:`shared.centering`)."""

    def get_center(self, model: nn.Module) -> np.ndarray:
        from shared.model import get_feature_center

        return get_feature_center(model)

    def set_center(self, model: nn.Module, center: np.ndarray) -> None:
        from shared.model import set_feature_center

        set_feature_center(model, center)


class RandomLabelCanaries:
    """Canary rows (a random text with a random label) for the one-run privacy audit (:mod:`shared.canary_data`)."""

    def add_site_canaries(self, rows: Rows, cfg: RunConfig, site: Site) -> Rows:
        from shared.canary_data import add_site_canaries

        return add_site_canaries(_labelled(rows), canaries=cfg.canaries, seed=cfg.seed, site=site)  # type: ignore[no-any-return]

    def start(self, model: nn.Module, cfg: RunConfig, rows: Rows, *, num_sites: int) -> CanaryScoring | None:
        from shared.canary_data import CanaryScorer
        from shared.model import encode, load_tokenizer

        tokenizer = load_tokenizer(cfg.model_path)
        return CanaryScorer.start(
            model,
            lambda texts, labels: encode(tokenizer, texts, labels, max_length=cfg.max_length),
            canaries=cfg.canaries,
            seed=cfg.seed,
            num_sites=num_sites,
            num_labels=len(_labelled(rows).label_names),
        )


class NoisyConfusionMatrix:
    """A site's opt-in evaluation: its confusion matrix under the Gaussian mechanism (:mod:`client.evaluation`)."""

    def event(self, noise_multiplier: float) -> DpEvent:
        from client.evaluation import evaluation_event

        return evaluation_event(noise_multiplier)

    def release(
        self, model: nn.Module, data: Encoded, rows: Rows, *, noise_multiplier: float, device: str
    ) -> dict[str, float | int | list[float]]:
        from client.evaluation import confusion_counts, noisy_counts, released_metrics
        from shared.metrics import predict

        labelled = _labelled(rows)
        predictions, _ = predict(model, data, device=device)  # the loss stays here: unbounded per row
        counts = confusion_counts(labelled.labels, predictions, num_classes=len(labelled.label_names))
        return released_metrics(noisy_counts(counts, noise_multiplier=noise_multiplier))


class ClassifierTask:
    """Text classification (run config ``task = "classify"``)."""

    name: ClassVar[str] = CLASSIFY
    presets: ClassVar[Mapping[str, Any]] = TASK_PRESETS[CLASSIFY]
    best_by: ClassVar[str] = "macro_f1"  # highest macro-F1 on the server's held-out rows (earliest on ties)

    centering: MeanFeatureCentering | None = MeanFeatureCentering()
    canary_audit: RandomLabelCanaries | None = RandomLabelCanaries()
    site_evaluation: NoisyConfusionMatrix | None = NoisyConfusionMatrix()

    # -- rows --------------------------------------------------------------------------------------------------
    def load_run_rows(self, cfg: RunConfig) -> LabelledText:
        from shared.federation import load_run_dataset

        return load_run_dataset(cfg)

    def load_eval_rows(self, cfg: RunConfig) -> LabelledText:
        from shared.data import load_labelled_text

        return load_labelled_text(
            cfg.eval_data_path, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.label_names
        )

    def load_site_rows(self, site: Site) -> LabelledText:
        from shared.data import DataError, load_labelled_text

        if site.data_path is None or site.labels is None:
            raise DataError(f"site {site.site_id!r}: the classifier reads a deployed site's data-path with its labels")
        return load_labelled_text(
            site.data_path, text_column=site.text_column, label_column=site.label_column, labels=site.labels
        )

    # -- model ---------------------------------------------------------------------------------------------------
    def check_model(self, cfg: RunConfig) -> None:
        from shared.model import resolve_model_path

        try:
            resolve_model_path(cfg.model_path)
        except ImportError as e:  # the builtin model's package is missing: say which one
            raise ValueError(str(e)) from e

    def fresh_model(self, cfg: RunConfig, rows: Rows) -> nn.Module:
        from shared.model import fresh_model

        names = _labelled(rows).label_names
        model = fresh_model(cfg, num_labels=len(names))
        id2label = dict(enumerate(names))  # the label names travel with the model, into the saved adapter's card
        config: Any = model.config
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
        return model

    def encode(self, cfg: RunConfig, rows: Rows) -> Encoded:
        from shared.model import encode, load_tokenizer

        labelled = _labelled(rows)
        return encode(load_tokenizer(cfg.model_path), labelled.texts, labelled.labels, max_length=cfg.max_length)

    def loss(self, model: nn.Module, batch: Encoded) -> torch.Tensor:
        from shared.model import classifier_loss  # the mean over the batch's rows, the local step's default

        return classifier_loss(model, batch)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluator(self, cfg: RunConfig, rows: Rows, *, device: str = "cpu") -> Callable[[nn.Module], Metrics]:
        from shared.metrics import evaluate_model

        data = self.encode(cfg, rows)
        names = list(_labelled(rows).label_names)
        return lambda model: evaluate_model(model, data, num_classes=len(names), label_names=names, device=device)

    def reference(self, rows: Rows) -> Metrics:
        from shared.metrics import majority_baseline

        labelled = _labelled(rows)
        return majority_baseline(labelled.labels, num_classes=len(labelled.label_names))

    def history_fields(self, rows: Rows, reference: Metrics) -> dict[str, Any]:
        # always predicting the most frequent test class; "class" is its index in label_names
        return {"label_names": list(_labelled(rows).label_names), "majority_baseline": reference}

    def score(self, metrics: Metrics) -> float:
        return float(metrics[self.best_by])

    def describe(self, metrics: Metrics, reference: Metrics) -> str:
        return (
            f"test loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} f1 {metrics['macro_f1']:.4f} "
            f"(majority {reference['accuracy']:.4f} / {reference['macro_f1']:.4f})"
        )

    def warnings(self, metrics: Metrics, reference: Metrics, rows: Rows) -> list[str]:
        from shared.metrics import quality_warnings

        return quality_warnings(metrics, reference, list(_labelled(rows).label_names))

    def evaluate_adapter(
        self,
        adapter_dir: Path,
        data_path: Path,
        *,
        base_model: str | None = None,
        max_rows: int | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> ClassifierEvaluation:
        from shared.classifier_evaluation import evaluate_classifier

        columns = dict(columns or {})
        unknown = sorted(set(columns) - {"text", "label"})
        if unknown:
            raise ValueError(f"a classifier's file has a text and a label column, not {unknown}")
        return evaluate_classifier(
            adapter_dir,
            data_path,
            text_column=columns.get("text", "text"),
            label_column=columns.get("label", "label"),
            base_model=base_model,
            max_rows=max_rows,
        )

    # -- output ------------------------------------------------------------------------------------------------
    def save_adapter(self, model: nn.Module, directory: Path, *, card: Mapping[str, Any]) -> Path:
        from server.outputs import save_adapter
        from shared.model import fold_feature_center

        folded = fold_feature_center(model)  # the head takes the plain pooled vector: the base model has no center
        own = {"task": CLASSIFY, "classifier_pooling": _pooling(model), "label_names": _label_names(model)}
        return save_adapter(folded, Path(directory).parent, card={**card, **own}, name=Path(directory).name)

    def publish(
        self,
        adapter_dir: Path,
        model: nn.Module,
        *,
        cfg: RunConfig,
        history: Mapping[str, Any],
        run_records: Sequence[Mapping[str, Any]],
    ) -> None:
        from server.outputs import publish_adapter
        from shared.model import fold_feature_center, load_tokenizer

        publish_adapter(  # the export plain transformers code loads, and the model card (README.md)
            adapter_dir,
            fold_feature_center(model),
            history=history,
            run_records=run_records,
            data_path=cfg.data_path,
            tokenizer=load_tokenizer(cfg.model_path),
        )


def _pooling(model: nn.Module) -> str:
    from shared.model import MeanPoolingClassifier, _base_model

    return "mean" if isinstance(_base_model(model), MeanPoolingClassifier) else "cls"


if TYPE_CHECKING:  # mypy holds the class to the interface
    from shared.tasks.base import Task

    _: Task = ClassifierTask()
