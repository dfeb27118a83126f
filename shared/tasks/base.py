"""What a task is: the one interface the ServerApp and ClientApp loops call and never look inside.

A task (text classification, causal-LM fine-tuning) says how rows are read and split, how they are encoded, how
the model every party builds identically is made, the loss of a batch (mean over its rows, so that Opacus's
per-sample gradients are each row's own), how the server evaluates on its held-out rows, how the adapter is
saved, and how a saved adapter is evaluated on a user's file (``privatune evaluate``). The loops in ``server/``
and ``client/`` hold no ``if task == ...``: what differs between tasks is here, in one file per task
(``shared/tasks/classifier.py``, ``shared/tasks/causal_lm.py``), and one contract test
(``tests/test_task_contract.py``) runs against every task.

Choosing a task: ``task`` in the run config (``"classify"``, the default, or ``"causal-lm"``); see
:func:`shared.tasks.get_task`. Each task's run-config presets are in :mod:`shared.tasks.presets`.

Capabilities: what only some tasks can do is an optional attribute, None where the task lacks it, never a check
of the task's name. The loops use a capability where the run config asks for it and refuse the run (a
``ConfigError`` on the server, a decline at a site) where the task has none:

- ``centering`` (:class:`FeatureCentering`): the round-0 DP query of the sites' mean pooled vector that the
  classifier's head is centered on (``center-features``; :mod:`shared.centering`, ``server/centering.py``);
- ``canary_audit`` (:class:`CanaryAudit`): canary records for the one-run privacy audit (``canaries``);
- ``site_evaluation`` (:class:`SiteEvaluation`): a site's opt-in answer to the server's evaluate request
  (``allow-evaluate``), a DP-noised release about its own rows (the classifier: the confusion matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.config import RunConfig
    from shared.model import Encoded
    from shared.site import Site


@runtime_checkable
class Rows(Protocol):
    """A task's rows: one DP record each. Immutable; ``subset`` keeps the order given."""

    @property
    def source(self) -> str:
        """Where the rows came from (a file path or a ``builtin:`` name), for messages."""
        ...

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Rows: ...

    def rows(self) -> Iterable[Sequence[str | int]]:
        """Each row as a tuple of its fields, in order: what the site's keyed fingerprint hashes."""
        ...

    @property
    def strata(self) -> np.ndarray:
        """An int64 class per row for stratified and label-skewed splits (all zeros: no classes)."""
        ...


# What the server's evaluation returns: metric name -> JSON number (always "loss"), or a JSON object of numbers per
# part of the rows (the classifier's ``per_class``: each label's rows, found and recall). JSON values only.
Metrics = dict[str, Any]
# A loss function the local DP step calls: (model, batch) -> scalar, the mean over the batch's rows of each row's
# own loss (never a mean over tokens of the whole batch: that would couple rows and break per-sample clipping).
LossFn = Callable[["nn.Module", "Encoded"], "torch.Tensor"]


class FeatureCentering(Protocol):
    """Capability: the model's head input is centered on a vector the sites estimate under DP in round 0."""

    def get_center(self, model: nn.Module) -> np.ndarray:
        """The model's current center (zeros before round 0); its length is the pooled vector's."""
        ...

    def set_center(self, model: nn.Module, center: np.ndarray) -> None: ...


class CanaryScoring(Protocol):
    """The server's side of a canary audit, started with the initial model."""

    def finish(self, model: nn.Module, run_dir: Path, *, run_id: str, seed: int, delta: float) -> Path: ...


class CanaryAudit(Protocol):
    """Capability: canary records inserted into simulated sites' rows and scored by the server."""

    def add_site_canaries(self, rows: Rows, cfg: RunConfig, site: Site) -> Rows:
        """A simulated site's rows with its canaries appended (``rows`` when ``canaries`` is 0)."""
        ...

    def start(self, model: nn.Module, cfg: RunConfig, rows: Rows, *, num_sites: int) -> CanaryScoring | None:
        """Score the run's canaries under the initial model; None when ``canaries`` is 0."""
        ...


class SiteEvaluation(Protocol):
    """Capability: a site's opt-in, DP-noised and ledgered release about the server's model on its own rows."""

    def event(self, noise_multiplier: float) -> Any:
        """The release's :class:`shared.privacy.DpEvent` at the site's own noise multiplier."""
        ...

    def release(
        self, model: nn.Module, data: Encoded, rows: Rows, *, noise_multiplier: float, device: str
    ) -> dict[str, float | int | list[float]]:
        """The noisy metrics the site sends (nothing exact about its rows)."""
        ...


class AdapterEvaluation(Protocol):
    """What ``privatune evaluate`` shows of a saved adapter on a file: the task's metrics next to its reference (the
    classifier: each label's recall and the majority class; the causal LM: the most common answer), and the
    warnings a run gives about its model."""

    @property
    def warnings(self) -> list[str]: ...

    def to_json(self) -> dict[str, Any]:
        """The evaluation as JSON values (``--json``)."""
        ...

    def report(self) -> str:
        """The evaluation as lines a person reads."""
        ...


class Task(Protocol):
    """One kind of fine-tuning. Instances are stateless apart from caches; every party builds the same one from
    the run config with :func:`shared.tasks.get_task`."""

    name: ClassVar[str]  # the run config's ``task`` value
    # the run-config values this task uses where the run config leaves a key at RunConfig's default (which are
    # the classifier's); applied identically by every party in RunConfig.from_flower
    presets: ClassVar[Mapping[str, Any]]
    best_by: ClassVar[str]  # the metric the best round is chosen by (higher is better; see ``score``)

    # -- optional capabilities (see the module docstring): None where the task has none; a plain attribute will do
    @property
    def centering(self) -> FeatureCentering | None: ...

    @property
    def canary_audit(self) -> CanaryAudit | None: ...

    @property
    def site_evaluation(self) -> SiteEvaluation | None: ...

    # -- rows --------------------------------------------------------------------------------------------------
    def load_run_rows(self, cfg: RunConfig) -> Rows:
        """The run's whole dataset (``data-path``), which a simulation splits among sites and the server's test."""
        ...

    def load_eval_rows(self, cfg: RunConfig) -> Rows:
        """The server's own held-out file in a deployment (``eval-data-path``), read with the run config's fields."""
        ...

    def load_site_rows(self, site: Site) -> Rows:
        """A deployed site's own file, read with the site's own node config (its columns / fields, its labels)."""
        ...

    # -- model ---------------------------------------------------------------------------------------------------
    def check_model(self, cfg: RunConfig) -> None:
        """Raise a ``ValueError`` naming what is wrong if ``model-path`` cannot be loaded; cheap (no weights): what a
        simulation's preflight checks before Flower starts."""
        ...

    def fresh_model(self, cfg: RunConfig, rows: Rows) -> nn.Module:
        """The PEFT model every party builds identically from the run config and seed (LoRA A from the seed under
        FFA-LoRA); a fresh copy per call. ``rows`` tells what the model needs from the data (e.g. the labels)."""
        ...

    def encode(self, cfg: RunConfig, rows: Rows) -> Encoded:
        """The rows as model inputs: ``labels`` per row (a class) or per token (``-100`` = no loss)."""
        ...

    def loss(self, model: nn.Module, batch: Encoded) -> torch.Tensor:
        """The batch's loss: the mean over its rows of each row's own loss (see :data:`LossFn`)."""
        ...

    # -- evaluation on the server's held-out rows (no site's privacy budget covers them) -------------------------
    def evaluator(self, cfg: RunConfig, rows: Rows, *, device: str = "cpu") -> Callable[[nn.Module], Metrics]:
        """A function that evaluates a model on the held-out ``rows``, encoded once."""
        ...

    def reference(self, rows: Rows) -> Metrics:
        """What a model must beat on ``rows`` without training (the classifier: always predicting the majority
        class); shown next to every round's metrics."""
        ...

    def history_fields(self, rows: Rows, reference: Metrics) -> dict[str, Any]:
        """What the run's metrics.json records about the held-out rows and the reference, next to the rounds (the
        classifier: ``label_names`` and ``majority_baseline``); JSON values only."""
        ...

    def score(self, metrics: Metrics) -> float:
        """The number the best round is chosen by (higher is better): ``metrics[best_by]`` or its negation."""
        ...

    def describe(self, metrics: Metrics, reference: Metrics) -> str:
        """The metrics part of the round's progress line, e.g. ``test loss 0.61 acc 0.70 f1 0.69 (majority ...)``."""
        ...

    def warnings(self, metrics: Metrics, reference: Metrics, rows: Rows) -> list[str]:
        """Loud one-line warnings about a model's metrics on the held-out ``rows`` (predicts one class, named; worse
        than the reference)."""
        ...

    def evaluate_adapter(
        self,
        adapter_dir: Path,
        data_path: Path,
        *,
        base_model: str | None = None,
        max_rows: int | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> AdapterEvaluation:
        """``privatune evaluate``: a saved adapter of this task (its card ``privatune.json`` says which task) on the
        rows of a user's file, read as this task reads one, scored as the server scores its held-out rows.
        ``base_model`` replaces the card's base model; ``max_rows`` scores only the first rows; ``columns`` are the
        file's columns by role (``text``, ``label``) that the user named: a ``ValueError`` naming the option for a
        task whose files have no such columns."""
        ...

    # -- output ----------------------------------------------------------------------------------------------
    def save_adapter(self, model: nn.Module, directory: Path, *, card: Mapping[str, Any]) -> Path:
        """Save the adapter (PEFT format) and this project's small card (``privatune.json``) in ``directory``."""
        ...

    def publish(
        self,
        adapter_dir: Path,
        model: nn.Module,
        *,
        cfg: RunConfig,
        history: Mapping[str, Any],
        run_records: Sequence[Mapping[str, Any]],
    ) -> None:
        """Make a saved adapter usable without this project: no local path in ``adapter_config.json``, the model
        card in ``README.md`` (base model, data, rounds, epsilon and delta per site, test metrics)."""
        ...
