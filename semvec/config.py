"""The backfill job's one typed config: YAML file + CLI overrides, validated on the driver.

Everything here runs before Ray starts, so a bad value ends the job with exit code 2 and one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import yaml

from semvec.errors import ConfigError, choice_error


class Pooling(str, Enum):
    AUTO = "auto"  # whatever the model directory says (semvec.json, 1_Pooling/), else mean
    MEAN = "mean"
    CLS = "cls"
    MAX = "max"
    LAST = "last"  # last non-padding token: for decoder (GPT-style) models


class Granularity(str, Enum):
    SENTENCE = "sentence"
    TOKEN = "token"


class Aggregate(str, Enum):
    """What a chunked backfill writes per document (see semvec.chunking)."""

    NONE = "none"  # one row per chunk
    MEAN = "mean"  # one row per document: the token-weighted mean of its chunk vectors


class DType(str, Enum):
    """Precision of the forward pass. The `-mixed` mode keeps float32 weights, residual stream,
    norms and softmax, and runs the matrix products in bfloat16 (torch autocast): vectors stay
    within cosine 0.9999 of float32, and it is fast where the hardware has bfloat16 units. `auto`
    picks the fastest of float32 and bfloat16-mixed for the device (semvec.precision)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    BFLOAT16_MIXED = "bfloat16-mixed"


class InputFormat(str, Enum):
    AUTO = "auto"  # from the file extension
    JSONL = "jsonl"
    PARQUET = "parquet"
    CSV = "csv"
    TSV = "tsv"
    TXT = "txt"


def parse_enum(enum: type[Enum], what: str, value: Any) -> Enum:
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        raise choice_error(what, value, list(enum)) from None


CPU_BATCH_ROWS, GPU_BATCH_ROWS = 2048, 8192  # EmbedConfig.batch_rows by default


@dataclass
class EmbedConfig:
    """One backfill job. Fields marked 'output-shaping' enter the config hash."""

    input: str
    output: str
    model: str = "bundled"
    text_field: str = "text"
    id_field: str | None = None
    title_field: str | None = None  # a title put before the text: "TITLE TEXT", as BEIR reads one
    input_format: InputFormat = InputFormat.AUTO
    pooling: Pooling = Pooling.AUTO
    normalize: bool | None = None  # None: the model's own choice (a Normalize module -> True)
    max_length: int | None = None  # None: the model's max_seq_length, else its tokenizer limit
    granularity: Granularity = Granularity.SENTENCE
    dtype: DType = DType.AUTO
    trust_remote_code: bool = False
    # Rows longer than this many characters go to quarantine instead of the tokenizer.
    max_chars: int = 200_000
    # Long documents: token windows instead of truncation (semvec.chunking). None: off.
    chunk_tokens: int | None = None  # tokens per window, the model's special tokens included
    chunk_overlap: int = 0
    aggregate: Aggregate = Aggregate.NONE
    # Throughput knobs: they do not change a vector beyond float noise.
    # Padded tokens per forward pass. None: on CPU 1024 for float32, where small batches stay in
    # cache and run fastest, and 2048 for reduced precision (benchmarks/RESULTS.md); 16384 on a
    # GPU, which wants big ones.
    batch_tokens: int | None = None
    # Rows per Ray Data batch handed to one encoder actor, sorted by length within and cut into
    # forward passes. None: 2048 on CPUs; 8192 with GPUs, whose big forward passes would otherwise
    # span a wider range of lengths and pad more (the mixed benchmark corpus: 4.3% of the token
    # slots padding at 8192 rows, 13.7% at 2048; benchmarks/gpu.py prints it).
    batch_rows: int | None = None
    rows_per_file: int = 50_000
    min_workers: int = 1
    max_workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    # None: 1 with GPUs; on CPUs 2, capped by the cluster. Fewer actors with more threads each
    # measured faster here than one single-thread actor per core (benchmarks/RESULTS.md).
    cpus_per_worker: float | None = None
    num_gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # torch threads; None: cpus_per_worker
    # Started without a cluster (no RAY_ADDRESS) and on CPUs, a job of fewer rows runs its stages
    # in this process, one batch after another: starting Ray and an encoder actor costs more than
    # such a job gains from them (benchmarks/RESULTS.md, "Small jobs without Ray").
    ray_from_rows: int = 20_000
    overwrite: bool = False
    # Stop with exit 1 when more than this share of the rows given to the model fail to embed
    # (encode_failed, tokenize_failed): a broken model is a failure, not a success with nothing
    # embedded. 1 = off.
    max_failed_share: float = 0.05
    lease_ttl_s: float = 120.0  # an s3:// output's lease is stale after this long unrenewed

    HELP: ClassVar[dict[str, str]] = {
        "input": "file, folder (recursive) or glob; local or s3://; jsonl, parquet, csv, tsv, txt, "
                 "each optionally .gz",
        "output": "output prefix, local or s3://: parquet parts, _quarantine/, _manifest.json",
        "model": "bundled, a local Hugging Face directory, s3://bucket/prefix/, models:/NAME/VERSION "
                 "or models:/NAME@ALIAS",
        "text_field": "the field (column) that holds the text",
        "id_field": "the field that holds each row's id (default: FILE:ROW)",
        "title_field": "a field whose value goes before the text, joined by a space (BEIR's title "
                       "and text, as `semvec evaluate retrieval --model` reads them; a row without "
                       "one is its text alone; token and chunk offsets are into the joined text) "
                       "(default: none)",
        "input_format": "input format (auto: from each file's extension)",
        "pooling": "how token vectors become one vector (auto: the model's own choice, else mean "
                   "for encoders and last for decoders)",
        "normalize": "L2-normalise the vectors (default: the model's own choice)",
        "max_length": "tokens per text; longer texts are truncated and flagged (default: the "
                      "model's max_seq_length)",
        "granularity": "sentence: one vector a row; token: also every token's vector, text and offsets",
        "dtype": "precision of the forward pass; auto: bfloat16-mixed where the CPU or GPU has "
                 "bfloat16 units (every vector within cosine 0.9999 of float32), else float32",
        "trust_remote_code": "run model code shipped inside the model directory",
        "max_chars": "rows with more characters go to quarantine (text_too_long)",
        "chunk_tokens": "split texts longer than this many tokens (special tokens included) into "
                        "overlapping windows and embed each: one output row per chunk with id, "
                        "chunk, start and end (character offsets); nothing is truncated (default: "
                        "off, texts are truncated to max_length)",
        "chunk_overlap": "tokens each window shares with the next (with chunk_tokens)",
        "aggregate": "with chunk_tokens: none writes one row per chunk, mean one row per document "
                     "(the token-weighted mean of its chunk vectors, renormalised)",
        "batch_tokens": "padded tokens per forward pass (default: 1024 on CPU for float32, 2048 for "
                        "reduced precision, 16384 on a GPU)",
        "batch_rows": "rows per Ray Data batch handed to one encoder actor (default: 2048 on CPUs, "
                      "8192 with GPUs)",
        "rows_per_file": "rows per output parquet part at most (with chunk_tokens: documents, each "
                         "with all its chunks)",
        "min_workers": "encoder actors to start with",
        "max_workers": "encoder actors at most (default: as many as the cluster's CPUs or GPUs allow)",
        "cpus_per_worker": "CPUs per encoder actor (default: 1 with GPUs, else 2 capped by the cluster)",
        "num_gpus_per_worker": "GPUs per encoder actor (1: each actor on its own GPU)",
        "threads_per_worker": "torch threads per encoder actor (default: its CPUs)",
        "ray_from_rows": "started without a cluster (RAY_ADDRESS unset) and without GPUs, inputs of "
                         "fewer rows (estimated) are embedded in this process without Ray, one batch "
                         "after another; the pool options then do not apply",
        "overwrite": "replace an output written with another model, settings or input (else it is "
                     "refused)",
        "max_failed_share": "stop with exit 1 when more than this share of the rows given to the model "
                            "fail (encode_failed, tokenize_failed); 1 turns it off",
        "lease_ttl_s": "seconds after which an s3:// output's unrenewed lease counts as stale",
    }
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"input_format": ("--format",)}

    HASHED = (
        "model", "text_field", "id_field", "input_format", "pooling", "normalize", "max_length",
        "granularity", "dtype", "max_chars", "chunk_tokens", "chunk_overlap", "aggregate", "title_field",
    )

    def __post_init__(self) -> None:
        self.input_format = parse_enum(InputFormat, "input format", self.input_format)
        self.pooling = parse_enum(Pooling, "pooling", self.pooling)
        self.granularity = parse_enum(Granularity, "granularity", self.granularity)
        self.dtype = parse_enum(DType, "dtype", self.dtype)
        self.aggregate = parse_enum(Aggregate, "aggregate", self.aggregate)
        for name in ("input", "output", "model", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        positive = ("max_chars", "rows_per_file", "min_workers", "ray_from_rows")
        for name in positive:
            _require_positive_int(name, getattr(self, name))
        for name in ("max_length", "max_workers", "threads_per_worker", "batch_tokens", "chunk_tokens",
                     "batch_rows"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        self._check_chunking()
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ConfigError(
                f"max_workers {self.max_workers} is below min_workers {self.min_workers}"
            )
        if isinstance(self.max_failed_share, bool) or not isinstance(self.max_failed_share, (int, float)) \
                or not 0 <= self.max_failed_share <= 1:
            raise ConfigError(f"max_failed_share must be a number from 0 to 1, got {self.max_failed_share!r}")
        require_lease_ttl(self.lease_ttl_s)
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or self.num_gpus_per_worker < 0:
            raise ConfigError(
                f"cpus_per_worker must be > 0 and num_gpus_per_worker >= 0, got "
                f"{self.cpus_per_worker} and {self.num_gpus_per_worker}"
            )

    def _check_chunking(self) -> None:
        """What can be checked without the model; the window against the model's own length and
        special tokens is checked when the job plans (semvec.chunking.check_windows)."""
        if isinstance(self.chunk_overlap, bool) or not isinstance(self.chunk_overlap, int) \
                or self.chunk_overlap < 0:
            raise ConfigError(f"chunk_overlap must be an integer >= 0, got {self.chunk_overlap!r}")
        if self.chunk_tokens is None:
            for name, off in (("aggregate", Aggregate.NONE), ("chunk_overlap", 0)):
                if getattr(self, name) != off:
                    raise ConfigError(f"{name} {plain(getattr(self, name))!r} needs chunk_tokens")
            return
        if self.granularity == Granularity.TOKEN:
            raise ConfigError("chunk_tokens works with granularity sentence only; token mode "
                              "already keeps every token's vector")
        if self.chunk_overlap >= self.chunk_tokens:
            raise ConfigError(f"chunk_overlap {self.chunk_overlap} must be below chunk_tokens "
                              f"{self.chunk_tokens}")

    @property
    def rows_per_batch(self) -> int:
        """batch_rows, or its default for where the encoders run."""
        return self.batch_rows or (GPU_BATCH_ROWS if self.num_gpus_per_worker else CPU_BATCH_ROWS)

    def output_hash(self, model_fingerprint: str) -> str:
        """Hash of everything that shapes the output: a rerun with another hash is refused."""
        # A field added to HASHED later enters the hash only when set away from its default, so
        # the outputs written before it existed keep their hash (and are not refused on rerun).
        shaping = {name: plain(getattr(self, name)) for name in self.HASHED
                   if name not in _HASHED_WHEN_SET or getattr(self, name) != _HASHED_WHEN_SET[name]}
        if self.dtype in PARITY_DTYPES:  # one class: vectors within cosine 0.9999 of float32
            shaping["dtype"] = DType.FLOAT32.value
        shaping["model_fingerprint"] = model_fingerprint
        blob = json.dumps(shaping, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


# Precisions that hold the parity bar (every vector within cosine 0.9999 of float32) shape an
# output alike, so an output embedded in one is resumed in another (auto picks per node kind, and
# outputs written before auto existed, in float32, keep their hash); float16 and bfloat16 do not.
PARITY_DTYPES = (DType.AUTO, DType.FLOAT32, DType.BFLOAT16_MIXED)

_HASHED_WHEN_SET = {"chunk_tokens": None, "chunk_overlap": 0, "aggregate": Aggregate.NONE,
                    "title_field": None}


def plain(value: Any) -> Any:
    """An enum's value, anything else as it is (for hashes and manifests)."""
    return value.value if isinstance(value, Enum) else value


def _options_of(f) -> set[str]:
    """The keys a mapping setting takes, where its field's metadata says ("options"; as
    method_options takes MethodConfig's fields): so a misplaced one can be pointed home."""
    return set(f.metadata.get("options", ()))


def require_non_negative(name: str, value: Any) -> None:
    """A finite real number >= 0 (not a bool, not NaN or infinity), or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def require_int(name: str, value: Any, least: int) -> None:
    """An integer >= least (not a bool), or a ConfigError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")


def require_lease_ttl(value: Any) -> None:
    """Seconds after which an unrenewed s3:// lease is stale: a number >= 5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 5:
        raise ConfigError(f"lease_ttl_s must be a number of seconds >= 5, got {value!r}")


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class _SettingsLoader(yaml.SafeLoader):
    """YAML as people write settings: `lr: 2e-5` and `1e3` are numbers. PyYAML follows YAML 1.1,
    where a float needs a dot and a signed exponent, so those were strings (and `lr` refused)."""


_SettingsLoader.add_implicit_resolver(  # after SafeLoader's own: ints and dotted floats stay theirs
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text (a config file, a flag's value) as settings: safe, with exponent numbers."""
    return yaml.load(text, Loader=_SettingsLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_settings(path: Path) -> dict[str, Any]:
    """The mapping of settings in a YAML config file, or a one-line ConfigError naming the file
    and, for a YAML that does not parse, the problem and its line."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({type(exc).__name__})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings")
    return loaded


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # str(exc) spans several lines (context, marks, carets); the problem and where it is will do.
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def load_settings(cls: type, path: str | Path | None, required: tuple[str, ...],
                  overrides: dict[str, Any]):
    """Build a config dataclass from a YAML file (optional) plus overrides (None = not given)."""
    data: dict[str, Any] = {}
    if path is not None:
        data.update(read_yaml_settings(Path(path)))
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            value = {**data[key], **value}  # a mapping given on top of the file's adds to it
        data[key] = value
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        nested = {f.name: _options_of(f) for f in fields(cls)}
        homes = [f"{key} goes under {home}" for key in unknown for home, names in nested.items()
                 if key in names]
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}"
                          + (f" ({'; '.join(homes)})" if homes else "")
                          + f"; allowed: {', '.join(sorted(known))}")
    for name in required:
        if name not in data:
            raise ConfigError(f"missing required setting {name!r}")
    texts_are_text(cls, data, "")
    try:
        return cls(**data)
    except TypeError as exc:  # a wrong type that the dataclass itself rejects
        raise ConfigError(str(exc)) from None


def settings_of(cls: type, name: str, set_by_job: tuple[str, ...], doc: str,
                extra: tuple[tuple[str, type, str], ...] = ()) -> type:
    """A typed config for a job run inside another: cls's fields (same types, defaults and help)
    less those the outer job sets, plus `extra` (name, type, help; required, first).

    Made from cls, not written out again, so the nested settings cannot drift from the job's own.
    The outer config validates the whole by building cls from them with the values it sets."""
    hints = typing.get_type_hints(cls)
    required, optional = [(n, t, dataclasses.field()) for n, t, _ in extra], []
    for f in fields(cls):
        if f.name in set_by_job or not f.init:
            continue
        if _required(f):
            required.append((f.name, hints[f.name], dataclasses.field()))
        else:
            default = ({"default": f.default} if f.default is not dataclasses.MISSING
                       else {"default_factory": f.default_factory})
            optional.append((f.name, hints[f.name], dataclasses.field(**default)))
    namespace = {"__doc__": doc, "SET_BY_JOB": set_by_job, "__post_init__": _parse_enum_fields,
                 "HELP": {**{n: h for n, _, h in extra}, **cls.HELP}}
    return dataclasses.make_dataclass(name, required + optional, namespace=namespace)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _parse_enum_fields(self) -> None:
    """Choices given as text become their Enum (a bad one is a one-line error naming the allowed)."""
    for name, hint in typing.get_type_hints(type(self)).items():
        kinds = [k for k in (hint, *typing.get_args(hint)) if isinstance(k, type) and issubclass(k, Enum)]
        if kinds and getattr(self, name) is not None:
            setattr(self, name, parse_enum(kinds[0], name.replace("_", " "), getattr(self, name)))


def floats_as_floats(config: Any) -> None:
    """A whole number given for a float setting (YAML's `1` for --l2sp's 1.0) becomes a float, so
    the config, what records it (MLflow params) and hashes of it read the same however it was
    written. Runs after validation, which takes either."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name, None)
        if float in (hint, *typing.get_args(hint)) and isinstance(value, int) and not isinstance(value, bool):
            try:
                setattr(config, name, float(value))
            except OverflowError:
                raise ConfigError(f"{name} is too large a number, got {value}") from None


def nested_settings(cls: type, what: str, value: Any):
    """A mapping (from YAML or a flag) -> an instance of a settings_of class, or a one-line
    ConfigError naming the unknown, job-set or missing settings."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping of settings, got {value!r}")
    known = {f.name for f in fields(cls)}
    by_job = sorted(set(value) & set(cls.SET_BY_JOB))
    if by_job:
        raise ConfigError(f"{what} settings {by_job} are set by the retraining job itself")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown {what} setting(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(known))}")
    missing = [f.name for f in fields(cls) if f.name not in value and _required(f)]
    if missing:
        raise ConfigError(f"{what} needs {missing}")
    texts_are_text(cls, value, f"{what} ")
    return cls(**value)


def texts_are_text(cls: type, data: dict[str, Any], what: str) -> None:
    """A text setting given a number in YAML (`name: 2024`, `name: 1e3`, which YAML reads as 1000.0)
    is a one-line error asking for quotes, not a run named "1000.0" or a crash inside the job; a
    number setting given text (`dropout: "0.1"`) one asking for none, not a TypeError from inside
    the config's checks that names no setting."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        if str in kinds and value is not None and not isinstance(value, (str, Enum, os.PathLike)):
            raise ConfigError(f"{what}{name} must be text, got {value!r}; in YAML, quote it: {name}: '...'")
        if str not in kinds and {int, float} & set(kinds) and isinstance(value, str):
            raise ConfigError(f"{what}{name} must be a number, got {value!r}; in YAML, write it "
                              f"without quotes: {name}: {value.strip()}")


def plain_settings(value: Any) -> Any:
    """Enums as their values, through nested configs, lists and mappings (for JSON, YAML, MLflow)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_settings(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain_settings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_settings(v) for v in value]
    return plain(value)


def load_embed_config(path: str | Path | None = None, **overrides: Any) -> EmbedConfig:
    """Read a backfill YAML config (optional) and apply overrides (None means 'not given')."""
    return load_settings(EmbedConfig, path, ("input", "output"), overrides)


def replace(config: EmbedConfig, **changes: Any) -> EmbedConfig:
    return dataclasses.replace(config, **changes)
