"""Evaluation tasks: MedQA-USMLE, PubMedQA, USMLE self-assessment, generic multiple-choice JSONL.

Each loader reads the native files and returns a `TaskData` (items + excluded ids with reasons); `load_task(name, path)`
dispatches by task name.
"""
from __future__ import annotations

import os
from typing import Any

from .base import EvalItem, Excluded, TaskData, format_options
from .mcq import load_mcq
from .medqa import load_medqa
from .pubmedqa import PUBMEDQA_LABELS, load_pubmedqa
from .usmle import load_usmle

TASKS = ("medqa", "pubmedqa", "usmle", "mcq")


def load_task(task: str, path: str | os.PathLike, **kwargs: Any) -> TaskData:
    """Load `task` ("medqa" | "pubmedqa" | "usmle" | "mcq") from `path`; kwargs go to the task's loader
    (pubmedqa: ground_truth, split; usmle: steps, images, exclude_images)."""
    loaders = {"medqa": load_medqa, "pubmedqa": load_pubmedqa, "usmle": load_usmle, "mcq": load_mcq}
    if task not in loaders:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return loaders[task](path, **kwargs)


__all__ = ["EvalItem", "Excluded", "TaskData", "format_options", "load_task", "load_medqa", "load_pubmedqa",
           "load_usmle", "load_mcq", "PUBMEDQA_LABELS", "TASKS"]
