"""``privatune evaluate``: a saved adapter of any task on a user's file, scored as the server scores its held-out
rows, next to the task's reference, with the warnings a run gives about its model.

The adapter's card (``privatune.json``) names the task it was trained for, and the task (:mod:`shared.tasks`)
reads the file and scores the adapter: a classifier's accuracy, macro-F1, each label's recall and the confusion
matrix next to the majority class (:mod:`shared.classifier_evaluation`); a causal LM's loss, perplexity and exact
match next to the most common answer (:mod:`shared.causal_evaluation`).
"""

from __future__ import annotations

from pathlib import Path

from shared.predict import adapter_task_name
from shared.tasks import get_task
from shared.tasks.base import AdapterEvaluation


def evaluate_adapter(
    adapter_dir: str | Path,
    data_path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    base_model: str | None = None,
    max_rows: int | None = None,
) -> AdapterEvaluation:
    """The adapter of ``adapter_dir`` on the rows of ``data_path`` (the first ``max_rows``), by the task its card
    names. ``text_column`` and ``label_column`` name a classifier's file columns (default ``text`` and
    ``label``); ``base_model`` is where the base model lives here (default: the card's)."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max-rows must be at least 1, got {max_rows}")
    adapter_dir = Path(adapter_dir).expanduser()
    columns = {role: name for role, name in (("text", text_column), ("label", label_column)) if name is not None}
    task = get_task(adapter_task_name(adapter_dir))
    return task.evaluate_adapter(
        adapter_dir, Path(data_path).expanduser(), base_model=base_model, max_rows=max_rows, columns=columns
    )
