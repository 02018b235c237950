"""Load a model directory that `semvec train` exported back into a TaskModel, for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from semvec import models
from semvec.config import Pooling
from semvec.errors import ConfigError
from semvec.train.data import Task
from semvec.train.tasks import Collator, Loss, TaskModel, evaluate, resolve_loss


def load_task_model(ref: str) -> tuple[TaskModel, Collator, dict]:
    """(model, collator, semvec.json) for a model reference written by `semvec train`."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from semvec.encode import load_tokenizer
    from semvec.train.methods import load_extras

    model_dir = models.resolve_model(ref)
    info_path = model_dir / models.SEMVEC_JSON
    if not info_path.is_file():
        raise ConfigError(f"model {ref!r} has no {models.SEMVEC_JSON}: it was not trained by semvec")
    info = json.loads(info_path.read_text())
    task = Task(info["task"])
    base = AutoModel.from_pretrained(str(model_dir), use_safetensors=True)
    encoder = load_extras(model_dir, base, info["method"])
    model = TaskModel(encoder, task, Pooling(info["pooling"]), int(base.config.hidden_size),
                      len(info["labels"]), resolve_loss(task, Loss.AUTO))
    head = model_dir / "head.safetensors"
    if model.head is not None:
        if not head.is_file():
            raise ConfigError(f"model {ref!r} is a {task.value} model without head.safetensors")
        model.head.load_state_dict(load_file(str(head)))
    collate = Collator(load_tokenizer(Path(model_dir)), task, int(info["max_length"]), info["labels"])
    return model.eval(), collate, info


def evaluate_task(ref: str, data: str, task: Task) -> dict:
    """Score a trained model on labelled data of its own task."""
    from semvec.train.data import load_examples

    model, collate, info = load_task_model(ref)
    if model.task != task:
        raise ConfigError(f"model {ref!r} was trained for {model.task.value}, not {task.value}")
    examples = load_examples(task, data)
    unknown = sorted({lab for e in examples for lab in ([e["label"]] if task == Task.CLASSIFICATION
                                                         else e.get("tags", []))} - set(info["labels"]))
    if unknown:
        raise ConfigError(f"labels {unknown[:5]} in {data!r} are unknown to model {ref!r}")
    result = evaluate(model, collate, examples, info["labels"])
    return {"examples": len(examples), **result}
