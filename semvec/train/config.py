"""The fine-tuning job's one typed config, validated on the driver before Ray starts.

Its types (methods, their options, losses, continual terms) live here, free of torch, so that
building the CLI or checking a config imports no training code."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from semvec.config import floats_as_floats, load_settings, parse_enum, require_non_negative
from semvec.datasets import Task
from semvec.errors import ConfigError


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    PROMPT = "prompt"
    ADAPTER = "adapter"
    BITFIT = "bitfit"


@dataclass
class MethodConfig:
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: the attention + FFN linears of the model type
    prompt_tokens: int = 8  # virtual tokens for prompt tuning
    adapter_size: int = 16  # bottleneck width
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the lowest N transformer layers

    HELP: ClassVar[dict[str, str]] = {
        "lora_r": "lora: rank of the update",
        "lora_alpha": "lora: scale of the update (alpha / r)",
        "lora_dropout": "lora: dropout on the update's input",
        "lora_targets": "lora: leaf names of the linear layers to adapt, as a YAML list (default: "
                        "the attention and feed-forward linears of the model type)",
        "prompt_tokens": "prompt: virtual tokens prepended to every input",
        "adapter_size": "adapter: bottleneck width",
        "freeze_embeddings": "freeze the embedding layers",
        "freeze_layers": "freeze the lowest N transformer layers",
    }
    # which methods an option means something for (absent: every method)
    APPLIES: ClassVar[dict[str, tuple[Method, ...]]] = {
        "lora_r": (Method.LORA,), "lora_alpha": (Method.LORA,), "lora_dropout": (Method.LORA,),
        "lora_targets": (Method.LORA,), "prompt_tokens": (Method.PROMPT,),
        "adapter_size": (Method.ADAPTER,),
    }

    def __post_init__(self):
        for name in ("lora_r", "lora_alpha", "prompt_tokens", "adapter_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.freeze_layers, bool) or not isinstance(self.freeze_layers, int) \
                or self.freeze_layers < 0:
            raise ConfigError(f"freeze_layers must be an integer >= 0, got {self.freeze_layers!r}")
        targets = self.lora_targets
        if targets is not None and (not isinstance(targets, list) or not targets
                                    or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"lora_targets must be a non-empty list of module names, got {targets!r}")
        floats_as_floats(self)


class Loss(str, Enum):
    AUTO = "auto"  # cosent for sts, mnrl for pairs, cross-entropy otherwise
    COSENT = "cosent"
    COSINE_MSE = "cosine_mse"
    MNRL = "mnrl"
    CROSS_ENTROPY = "cross_entropy"


ALLOWED_LOSSES = {
    Task.STS: (Loss.COSENT, Loss.COSINE_MSE), Task.PAIRS: (Loss.MNRL,),
    Task.CLASSIFICATION: (Loss.CROSS_ENTROPY,), Task.NER: (Loss.CROSS_ENTROPY,),
}


def resolve_loss(task: Task, loss: Loss) -> Loss:
    return ALLOWED_LOSSES[task][0] if loss == Loss.AUTO else loss


@dataclass
class ContinualConfig:
    l2sp: float = 0.0
    ewc: float = 0.0
    distill: float = 0.0
    fisher_batches: int = 32

    @property
    def active(self) -> bool:
        return bool(self.l2sp or self.ewc or self.distill)


class Optimizer(str, Enum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"


# Learning rates per method: updating few parameters wants a larger step. Tasks with a freshly
# initialised head (and token-level labels) move further from the pre-trained encoder than
# similarity tuning does, so full tuning (and BitFit on NER) takes a larger step there. The NER
# rates and epochs were chosen on CoNLL-2003 dev (benchmarks/RESULTS.md).
DEFAULT_LR = {Method.FULL: 2e-5, Method.LORA: 5e-4, Method.BITFIT: 1e-3, Method.ADAPTER: 1e-3,
              Method.PROMPT: 1e-2}
TASK_LR = {(Method.FULL, Task.CLASSIFICATION): 5e-5, (Method.FULL, Task.NER): 1e-4,
           (Method.BITFIT, Task.NER): 3e-3}
DEFAULT_EPOCHS = 4
TASK_EPOCHS = {(Method.FULL, Task.NER): 6, (Method.BITFIT, Task.NER): 6}


@dataclass
class TrainConfig:
    task: Task
    method: Method
    train: str
    output: str
    dev: str | None = None  # None: a seeded 10% of train is held out for choosing
    # pairs: more documents for the dev queries to rank beside the dev positives, as a retrieval
    # test ranks a whole corpus (a dev of a few dozen positives alone is too easy to choose by)
    dev_corpus: str | None = None
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
    method_options: dict = field(default_factory=dict,  # MethodConfig fields
                                 metadata={"options": tuple(f.name for f in fields(MethodConfig))})
    # continual learning (semvec.train.continual): past data mixed in, and pulls toward the start
    replay: str | None = None  # past training data of the same task
    replay_share: float = 0.5  # replay examples added, as a share of the new training examples
    l2sp: float = 0.0
    ewc: float = 0.0
    distill: float = 0.0
    name: str | None = None  # run name: a rerun with the same name, output, settings and data resumes
    trust_remote_code: bool = False

    HELP: ClassVar[dict[str, str]] = {
        "task": "what the labelled data teaches",
        "method": "which weights change",
        "train": "training data (jsonl/csv/tsv/parquet, the STS-B/CNSD/TREC/SST releases, or CoNLL "
                 "columns), local or s3://, optionally .gz",
        "output": "where the model directory goes, local or s3://",
        "dev": "dev data for choosing the checkpoint (default: a seeded 10%% of train)",
        "dev_corpus": "pairs task: documents the dev anchors rank beside the dev positives, as a "
                      "retrieval test ranks a corpus (jsonl with text and optional title, as a BEIR "
                      "corpus.jsonl; or txt, one a line); local or s3://, optionally .gz (default: "
                      "the dev positives alone)",
        "model": "the model to start from (any model reference)",
        "epochs": "passes over the training data (default: 6 for full and bitfit NER, else 4)",
        "workers": "Ray Train workers (DDP); each sees a different share of every epoch",
        "use_gpu": "one GPU per worker",
        "cpus_per_worker": "CPUs (and torch threads) per worker (default: the cluster's CPUs shared "
                           "out; 1 beside a GPU)",
        "batch_size": "examples per step on each worker",
        "lr": "peak learning rate (default: by method: full 2e-5 (5e-5 classification, 1e-4 NER), "
              "lora 5e-4, bitfit 1e-3 (3e-3 NER), adapter 1e-3, prompt 1e-2)",
        "weight_decay": "AdamW weight decay",
        "optimizer": "the optimizer",
        "schedule": "learning-rate schedule after warm-up",
        "warmup_ratio": "share of the steps spent warming the learning rate up from 0",
        "max_grad_norm": "gradients are clipped to this norm (inf: not clipped)",
        "dropout": "dropout before a classification or NER head",
        "loss": "auto: cosent for sts, mnrl for pairs, cross_entropy otherwise; sts also takes "
                "cosine_mse",
        "symmetric": "pairs: also rank the anchors for each positive",
        "max_length": "tokens per text (default: the model's limit)",
        "seed": "seed for initialisation, shuffling and the dev split",
        "eval_steps": "also evaluate and checkpoint every N optimizer steps (default: each epoch end)",
        "patience": "evaluations without a better dev metric before stopping early",
        "keep_checkpoints": "best checkpoints kept beside the output (OUTPUT-checkpoints/)",
        "max_failures": "restarts from the last checkpoint after a worker dies (-1: no limit)",
        "method_options": "method settings as a mapping (the method flags below set them one by one)",
        "replay": "continual learning: past training data of this task, mixed in (default: none)",
        "replay_share": "replay examples added, as a share of the new training examples",
        "l2sp": "weight of the pull toward the starting weights (0: off)",
        "ewc": "weight of EWC, the pull weighted by Fisher information on the replay data (0: off)",
        "distill": "weight of keeping pooled vectors close to the starting model's on replay text (0: off)",
        "name": "run name; a rerun with the same name, output, settings and data resumes from its last "
                "checkpoint (default: from task, method and output)",
        "trust_remote_code": "run model code shipped inside the model directory",
    }

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
        for name, infinite in (("lr", False), ("max_grad_norm", True)):  # inf: no clipping
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0 or (value == math.inf and not infinite)):
                raise ConfigError(f"{name} must be a {'' if infinite else 'finite '}number > 0, "
                                  f"got {value!r}")
        require_non_negative("weight_decay", self.weight_decay)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) \
                or self.max_failures < -1:
            raise ConfigError(f"max_failures must be an integer >= 0, or -1 for no limit, got "
                              f"{self.max_failures!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool)
                                            or not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.symmetric and self.task != Task.PAIRS:
            raise ConfigError(f"symmetric ranks the anchors for each positive: the pairs task's; task "
                              f"{self.task.value} has no anchors")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("warmup_ratio and dropout must be in [0, 1)")
        for name in ("replay_share", "l2sp", "ewc", "distill"):
            require_non_negative(name, getattr(self, name))
        if self.dev_corpus is not None and self.task != Task.PAIRS:
            raise ConfigError(f"dev_corpus ranks documents for the pairs task; task {self.task.value} "
                              "has no ranking on dev")
        if (self.ewc or self.distill) and not self.replay:
            raise ConfigError("ewc and distill need replay data (past training data of this task): "
                              "set replay")
        unknown = set(self.method_options) - {f.name for f in fields(MethodConfig)}
        if unknown:
            allowed = ", ".join(f.name for f in fields(MethodConfig))
            raise ConfigError(f"unknown method option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        options = self.method_config()  # validates the options
        self.method_options = {k: getattr(options, k) for k in self.method_options}  # 0 -> 0.0 too
        foreign = sorted(k for k in self.method_options
                         if self.method not in MethodConfig.APPLIES.get(k, tuple(Method)))
        if foreign:
            raise ConfigError(f"method option(s) {', '.join(foreign)} do not apply to method "
                              f"{self.method.value}")
        floats_as_floats(self)

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
