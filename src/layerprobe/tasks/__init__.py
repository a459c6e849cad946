"""Tasks: configs -> examples (id, prompt, label, split). See base.py for the data types."""
from __future__ import annotations

from .base import SPLITS, Example, TaskData, TaskError, assign_splits, finalize_task
from .demo import DEMO_TASKS, load_demo_suite


def load_tasks(cfg) -> list[TaskData]:
    """Build every task a `TaskConfig` names, split with its fixed seed."""
    fractions = tuple(cfg.fractions)
    if cfg.source == "demo":
        return load_demo_suite(cfg.tasks, cfg.n_per_task, cfg.data_seed, fractions, cfg.split_seed)
    if cfg.source == "flan":
        from .flan import load_flan_tasks

        return load_flan_tasks(cfg, fractions, cfg.split_seed)
    from .files import load_file_tasks

    return load_file_tasks(cfg, fractions, cfg.split_seed)


__all__ = ["SPLITS", "Example", "TaskData", "TaskError", "assign_splits", "finalize_task", "DEMO_TASKS", "load_tasks"]
