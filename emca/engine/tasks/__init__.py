"""The tasks a run can train (emca/engine/task.py says what a task supplies): one module each, one
entry in TASKS. The run (emca/engine/trainer.py) builds the one its config names and knows no other."""

from __future__ import annotations

from omegaconf import DictConfig

from emca.engine.distributed import DistributedContext
from emca.engine.task import Task
from emca.engine.tasks.classification import ClassificationTask
from emca.engine.tasks.detection import DetectionTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ClassificationTask, DetectionTask)}


def build_task(cfg: DictConfig, ctx: DistributedContext) -> Task:
    """The task `cfg.task` names, built on this process."""
    return TASKS[cfg.task.value](cfg, ctx)
