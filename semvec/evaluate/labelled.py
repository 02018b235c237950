"""Classification and NER: the head of a model that `semvec train` wrote, scored on labelled data of
its own task."""

from __future__ import annotations

from semvec import models
from semvec.datasets import Task, load_examples
from semvec.errors import ConfigError
from semvec.heads import load_task_model, task_metrics


def evaluate_labelled(ref: str, data: str, task: Task | str) -> dict:
    """{"examples", the task's metrics, "per_label", "confusion", "report"} for model ref on data
    (any layout semvec.datasets reads). Labels the model does not know are an error, not a silent
    miss."""
    task = Task(task)
    examples = load_examples(task, data)  # read (and checked) before the model loads
    model, collate, card = load_task_model(models.resolve_model(ref), ref)
    if model.task != task:
        raise ConfigError(f"model {ref!r} was trained for {model.task.value}, not {task.value}")
    unknown = sorted({lab for e in examples for lab in ([e["label"]] if task == Task.CLASSIFICATION
                                                         else e.get("tags", []))} - set(card.labels))
    if unknown:
        raise ConfigError(f"labels {unknown[:5]} in {data!r} are unknown to model {ref!r}")
    return {"examples": len(examples), **task_metrics(model, collate, examples, card.labels, detail=True)}
