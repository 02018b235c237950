"""The retraining job's config: what model, what new data, how to judge and what to re-embed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from semvec import storage
from semvec.config import (
    EmbedConfig,
    load_settings,
    nested_settings,
    parse_enum,
    plain_settings,
    require_non_negative,
    settings_of,
)
from semvec.datasets import METRIC, Kind, Task
from semvec.errors import ConfigError
from semvec.train.config import Method, TrainConfig

SuiteKind = Kind  # a suite is one of the kinds semvec.evaluate scores
TASK_KINDS = (Kind.CLASSIFICATION, Kind.NER)  # suites that score a task model's head, not vectors

# What a round sets itself: the data, the starting model, the output, and the continual settings
# (top-level settings of the retraining config, since every round must use them).
TrainSettings = settings_of(
    TrainConfig, "TrainSettings",
    ("task", "method", "train", "dev", "output", "model", "replay", "replay_share", "l2sp", "ewc",
     "distill", "name"),
    "The challenger's fine-tuning settings (epochs, workers, lr, ...): TrainConfig less what a round sets.")
BackfillSettings = settings_of(
    EmbedConfig, "BackfillSettings", ("model", "output"),
    "On promotion, embed `input` with models:/NAME/VERSION into OUTPUT_ROOT/vVERSION/: EmbedConfig "
    "less the model and output, which the round sets.",
    extra=(("output_root", str, "prefix under which each promoted version's output goes (vVERSION/)"),))
SUITE_FILES = {SuiteKind.RETRIEVAL: ("corpus", "queries", "qrels")}


@dataclass
class Suite:
    name: str
    kind: SuiteKind
    data: str | None = None  # sts / classification / ner
    corpus: str | None = None  # retrieval (BEIR layout)
    queries: str | None = None
    qrels: str | None = None

    def __post_init__(self) -> None:
        try:
            self.kind = parse_enum(SuiteKind, "suite kind", self.kind)
        except ConfigError as exc:
            raise ConfigError(f"suite {self.name!r}: {exc}") from None
        for name in SUITE_FILES.get(self.kind, ("data",)):
            if not getattr(self, name):
                raise ConfigError(f"suite {self.name!r} ({self.kind.value}) needs {name!r}")

    @property
    def metric(self) -> str:
        return METRIC[self.kind]

    def named_files(self) -> list[tuple[str, str]]:
        """(setting, path) of each file the suite reads."""
        return [(n, getattr(self, n)) for n in SUITE_FILES.get(self.kind, ("data",))]


@dataclass
class RetrainConfig:
    name: str  # registered model; the challenger starts from models:/NAME@champion
    task: Task
    snapshots: list[str]  # new labelled data: files, folders or globs; local or s3://
    state: str  # prefix for the lock, the record of trained snapshots, the replay store, challengers
    suites: list[dict]  # the first is primary unless `primary` names another; the rest are guards
    method: Method = Method.FULL
    primary: str | None = None
    margin: float = 0.005  # the primary metric must improve by at least this much
    tolerance: float = 0.01  # no guard metric may drop by more than this
    dev: str | None = None  # dev data for choosing the challenger's checkpoint (default: 10% of new)
    replay: list[str] = field(default_factory=list)  # past data besides the store (e.g. the first set)
    replay_share: float = 0.5
    l2sp: float = 0.0
    ewc: float = 0.0
    distill: float = 1.0
    train: TrainSettings | None = None  # other fine-tuning settings (None: train's defaults)
    backfill: BackfillSettings | None = None  # on promotion: re-embed into output_root/vVERSION/
    lock_timeout_s: int = 1800  # a lock not renewed for this long is stale (its holder died): taken
    experiment: str = "semvec-retrain"

    HELP: ClassVar[dict[str, str]] = {
        "name": "registered model; the challenger starts from models:/NAME@champion",
        "task": "the task of the labelled data",
        "snapshots": "new labelled data: files, folders or globs, local or s3:// (a YAML list)",
        "state": "prefix for the lock, the record of trained snapshots, the replay store and challengers",
        "suites": "evaluation suites as a YAML list of {name, kind, data | corpus, queries, qrels}; "
                  "the first is primary unless primary names another, the rest are guards",
        "method": "fine-tuning method of the challenger",
        "primary": "the suite that must improve (default: the first)",
        "margin": "the primary metric must improve by at least this much",
        "tolerance": "no guard metric may drop by more than this",
        "dev": "dev data for choosing the challenger's checkpoint (default: 10%% of the new data)",
        "replay": "past training data besides the replay store, a YAML list (default: none)",
        "replay_share": "replay examples added, as a share of the new examples",
        "l2sp": "weight of the pull toward the champion's weights",
        "ewc": "weight of EWC on the replay data",
        "distill": "weight of keeping pooled vectors close to the champion's on replay text",
        "train": "other fine-tuning settings as a YAML mapping: epochs, workers, lr, ... (default: "
                 "train's defaults)",
        "backfill": "on promotion, embed a corpus: backfill settings as a YAML mapping with input "
                    "and output_root, under which versioned outputs go (default: no backfill)",
        "lock_timeout_s": "a lock its holder has not renewed for this many seconds is stale and "
                          "taken over (the holder renews it every timeout / 6, at most 5 minutes)",
        "experiment": "MLflow experiment of the challenger runs",
    }

    def __post_init__(self) -> None:
        self.task = parse_enum(Task, "task", self.task)
        self.method = parse_enum(Method, "method", self.method)
        if self.method in (Method.ADAPTER, Method.PROMPT):  # the next round could not start from it
            raise ConfigError(f"method {self.method.value}: its weights live beside the model, which a "
                              "round cannot continue from once promoted; retraining tunes full, lora or "
                              "bitfit")
        if isinstance(self.snapshots, str):
            self.snapshots = [self.snapshots]
        if isinstance(self.replay, str):
            self.replay = [self.replay]
        if not self.snapshots:
            raise ConfigError("snapshots must name at least one file, folder or glob")
        from semvec.tracking import check_model_name  # imports no MLflow

        check_model_name(self.name)
        if not isinstance(self.suites, list) or not self.suites:
            raise ConfigError("suites must list at least one evaluation suite")
        try:
            self.suites = [s if isinstance(s, Suite) else Suite(**s) for s in self.suites]
        except TypeError as exc:
            raise ConfigError(f"a suite has an unknown setting: {exc}") from None
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ConfigError(f"suite names must be unique: {names}")
        if self.primary is None:
            self.primary = names[0]
        if self.primary not in names:
            raise ConfigError(f"primary suite {self.primary!r} is not one of {names}")
        for suite in self.suites:  # scored with the task's head: the challenger's task and no other
            if suite.kind in TASK_KINDS and suite.kind.value != self.task.value:
                raise ConfigError(f"suite {suite.name!r} ({suite.kind.value}) scores a {suite.kind.value} "
                                  f"model's head, but the challenger is trained for {self.task.value}")
        for name in ("margin", "tolerance", "replay_share", "l2sp", "ewc", "distill"):
            require_non_negative(name, getattr(self, name))
        if isinstance(self.lock_timeout_s, bool) or not isinstance(self.lock_timeout_s, (int, float)) \
                or not 1 <= self.lock_timeout_s < math.inf:  # 0 took every lock as stale at once
            raise ConfigError(f"lock_timeout_s must be a number of seconds >= 1, got {self.lock_timeout_s!r}")
        self.train = nested_settings(TrainSettings, "train", {} if self.train is None else self.train)
        if self.backfill is not None:
            self.backfill = nested_settings(BackfillSettings, "backfill", self.backfill)
        # The whole of each nested job, checked now with the values a round gives it: the first
        # snapshot as data, the champion as model, the replay store as past data.
        self.train_config(train=self.snapshots[0], model=f"models:/{self.name}@champion",
                          replay=self.replay_store, output=self.challengers)
        if self.backfill is not None:
            self.backfill_config(f"models:/{self.name}@champion", self.backfill.output_root)

    @property
    def replay_store(self) -> str:
        """Where each trained snapshot is copied, to be replayed by later rounds."""
        return storage.join(self.state, "replay")

    @property
    def challengers(self) -> str:
        """Where each round's challenger and its checkpoints are trained (removed once recorded)."""
        return storage.join(self.state, "challengers")

    def train_config(self, **given: Any) -> TrainConfig:
        """The challenger's TrainConfig; `given`: train, model, output, replay, name."""
        return TrainConfig(**{"task": self.task, "method": self.method, "dev": self.dev,
                              "replay_share": self.replay_share, "l2sp": self.l2sp, "ewc": self.ewc,
                              "distill": self.distill, **asdict(self.train), **given})

    def backfill_config(self, model: str, output: str, **given: Any) -> EmbedConfig:
        """The EmbedConfig of a promotion's backfill of `model` into `output`."""
        settings = {k: v for k, v in asdict(self.backfill).items() if k != "output_root"}
        return EmbedConfig(**{**settings, "model": model, "output": output, **given})

    def to_dict(self) -> dict[str, Any]:
        return plain_settings(self)


def load_retrain_config(path: str | Path | None = None, **overrides: Any) -> RetrainConfig:
    return load_settings(RetrainConfig, path, ("name", "task", "snapshots", "state", "suites"),
                         overrides)
