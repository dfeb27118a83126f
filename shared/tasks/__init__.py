"""The registry of tasks: :func:`get_task` turns the run config's ``task`` into a :class:`~shared.tasks.base.Task`.

Each task lives in its own module and is imported only when a run asks for it (the classifier needs none of the
causal LM's code, and :mod:`shared.config` imports :mod:`shared.tasks.presets` without torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shared.tasks.presets import CAUSAL_LM, CLASSIFY, TASK_NAMES

if TYPE_CHECKING:
    from shared.config import RunConfig
    from shared.tasks.base import Task

# task name -> (module, class): the one place a task is registered
TASK_CLASSES: dict[str, tuple[str, str]] = {
    CLASSIFY: ("shared.tasks.classifier", "ClassifierTask"),
    CAUSAL_LM: ("shared.tasks.causal_lm", "CausalLMTask"),
}
assert tuple(TASK_CLASSES) == TASK_NAMES


class TaskError(ValueError):
    """An unknown task, or a task whose module is not installed in this checkout."""


def get_task(cfg_or_name: RunConfig | str) -> Task:
    """The task a run config (its ``task``) or a task name asks for; a fresh instance (tasks keep no state)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.task
    if name not in TASK_CLASSES:
        raise TaskError(f"unknown task {name!r}; known tasks: {list(TASK_CLASSES)}")
    module_name, class_name = TASK_CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the task's module is there but something it imports is not: that error says what
        raise TaskError(f"task {name!r} needs {module_name.replace('.', '/')}.py, which this checkout lacks") from e
    task: Task = getattr(module, class_name)()
    return task
