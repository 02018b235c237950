"""The fine-tuning job's one typed config, validated on the driver before Ray starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from semvec.config import load_settings, parse_enum, require_non_negative
from semvec.errors import ConfigError
from semvec.train.continual import ContinualConfig
from semvec.train.data import Task
from semvec.train.methods import Method, MethodConfig
from semvec.train.tasks import ALLOWED_LOSSES, Loss


class Optimizer(str, Enum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"


# Learning rates that train well per method: updating few parameters wants a larger step.
DEFAULT_LR = {Method.FULL: 2e-5, Method.LORA: 5e-4, Method.BITFIT: 1e-3, Method.ADAPTER: 1e-3,
              Method.PROMPT: 1e-2}
# Tasks with a freshly initialised head (and token-level labels) move further from the
# pre-trained encoder than similarity tuning does: full tuning (and BitFit on NER) takes a larger
# step there.
TASK_LR = {(Method.FULL, Task.CLASSIFICATION): 5e-5, (Method.FULL, Task.NER): 1e-4,
           (Method.BITFIT, Task.NER): 3e-3}
DEFAULT_EPOCHS = 4
# NER, chosen on CoNLL-2003 dev (benchmarks/RESULTS.md). Full: at 5e-5 for 4 epochs dev F1 was
# still rising at the last epoch (best 0.9146); 1e-4 for 6 epochs ends higher. BitFit: at 1e-3 for
# 4 epochs likewise (0.8284); 3e-3 for 6 epochs is ahead from epoch 2 on.
TASK_EPOCHS = {(Method.FULL, Task.NER): 6, (Method.BITFIT, Task.NER): 6}


@dataclass
class TrainConfig:
    task: Task
    method: Method
    train: str
    output: str
    dev: str | None = None  # None: a seeded 10% of train is held out for choosing
    model: str = "bundled"
    epochs: int | None = None  # None: TASK_EPOCHS, else DEFAULT_EPOCHS
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int | None = None  # None: the cluster's CPUs shared out (1 with a GPU)
    batch_size: int = 16  # per worker
    lr: float | None = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.01
    optimizer: Optimizer = Optimizer.ADAMW
    schedule: Schedule = Schedule.LINEAR
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    loss: Loss = Loss.AUTO
    symmetric: bool = False  # pairs: also rank anchors for each positive
    max_length: int | None = None
    seed: int = 42
    eval_steps: int | None = None  # evaluate on dev every N optimizer steps (and each epoch end)
    patience: int = 2  # evaluations without improvement before stopping
    keep_checkpoints: int = 2
    max_failures: int = 2  # a killed worker restarts the run from its last checkpoint
    method_options: dict = field(default_factory=dict)  # MethodConfig fields
    # continual learning (semvec.train.continual): past data mixed in, and pulls toward the start
    replay: str | None = None  # past training data of the same task
    replay_share: float = 0.5  # replay examples added, as a share of the new training examples
    l2sp: float = 0.0
    ewc: float = 0.0
    distill: float = 0.0
    name: str | None = None  # run name: a rerun with the same name and output resumes
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        self.task = parse_enum(Task, "task", self.task)
        self.method = parse_enum(Method, "method", self.method)
        self.optimizer = parse_enum(Optimizer, "optimizer", self.optimizer)
        self.schedule = parse_enum(Schedule, "schedule", self.schedule)
        self.loss = parse_enum(Loss, "loss", self.loss)
        if self.epochs is None:
            self.epochs = TASK_EPOCHS.get((self.method, self.task), DEFAULT_EPOCHS)
        if self.loss != Loss.AUTO and self.loss not in ALLOWED_LOSSES[self.task]:
            allowed = ", ".join(x.value for x in ALLOWED_LOSSES[self.task])
            raise ConfigError(
                f"loss {self.loss.value!r} does not fit task {self.task.value}; allowed: {allowed}"
            )
        for name in ("epochs", "workers", "batch_size", "keep_checkpoints", "patience",
                     "cpus_per_worker", "eval_steps"):
            value = getattr(self, name)
            if value is None and name in ("cpus_per_worker", "eval_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("warmup_ratio and dropout must be in [0, 1)")
        for name in ("replay_share", "l2sp", "ewc", "distill"):
            require_non_negative(name, getattr(self, name))
        if (self.ewc or self.distill) and not self.replay:
            raise ConfigError("ewc and distill need replay data (past training data of this task): "
                              "set replay")
        unknown = set(self.method_options) - {f.name for f in fields(MethodConfig)}
        if unknown:
            allowed = ", ".join(f.name for f in fields(MethodConfig))
            raise ConfigError(f"unknown method option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        self.method_config()  # validates the options

    def continual_config(self) -> ContinualConfig:
        return ContinualConfig(l2sp=float(self.l2sp), ewc=float(self.ewc), distill=float(self.distill))

    def method_config(self) -> MethodConfig:
        return MethodConfig(**self.method_options)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return TASK_LR.get((self.method, self.task), DEFAULT_LR[self.method])

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a fine-tuning YAML config (optional) and apply overrides (None means 'not given')."""
    return load_settings(TrainConfig, path, ("task", "method", "train", "output"), overrides)
