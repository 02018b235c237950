"""The fine-tuning job: validate on the driver, train on Ray Train, export the best checkpoint.

    plan (data, labels, model; all errors before Ray) -> TorchTrainer.fit -> best checkpoint
    -> model directory (HF + semvec.json + sentence-transformers files) -> MLflow
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from pathlib import Path

from semvec import crashpoints, figures, models, storage
from semvec.datasets import Task, example_labels, label_set, load_documents, load_examples
from semvec.errors import ConfigError, JobFailed
from semvec.heads import HEAD_FILE, PRIMARY
from semvec.redact import redact
from semvec.train.config import Method, TrainConfig
from semvec.train.report import write_report

DEV_SHARE = 0.1
log = logging.getLogger("semvec.train")


def plan(cfg: TrainConfig) -> tuple[dict, list[dict], list[dict]]:
    """Load and check data and model; returns (plan, train, dev)."""
    figures.require()  # the run's pictures, before any work
    train = load_examples(cfg.task, cfg.train)
    if cfg.dev:
        dev = load_examples(cfg.task, cfg.dev)
    else:  # hold out a seeded slice of train for choosing; never a test split
        dev, train = _hold_out(train, cfg)
        dev, train = _keep_labels_in_train(dev, train, cfg)
    if not train:
        raise ConfigError(f"train data {cfg.train!r} holds no examples after holding out dev")
    if cfg.task == Task.STS and dev and len({float(e["score"]) for e in dev}) < 2:
        held = f"dev data {cfg.dev!r}" if cfg.dev else f"the dev held out of {cfg.train!r} ({DEV_SHARE:.0%})"
        raise ConfigError(f"{held} gives every pair the score {float(dev[0]['score']):g}: Spearman, the "
                          "dev metric, is undefined; give --dev pairs with varied scores")
    anchors, replay_digest = _replay(cfg, len(train))
    train = train + anchors
    labels = label_set(train, dev, cfg.task)
    model_dir = models.resolve_model(cfg.model)
    if models.model_kind(model_dir) == models.ModelKind.STATIC:
        raise ConfigError(f"model {cfg.model!r} is a static model (a table of token vectors): it has "
                          "no transformer to fine-tune; tune the encoder it came from, then distil again")
    check_method(model_dir, cfg)
    known = _trained_labels(model_dir, cfg.task)  # a semvec model tuned further keeps its label order
    labels = known + [label for label in labels if label not in known]
    if cfg.task == Task.CLASSIFICATION and len(labels) < 2:
        raise ConfigError(f"train data {cfg.train!r} has one label ({labels[0]!r}) and the model knows no "
                          "other; classification needs at least two")
    defaults = models.model_defaults(model_dir)
    max_length = cfg.max_length or defaults.max_length
    if max_length > defaults.limit:
        raise ConfigError(f"max_length {max_length} exceeds the model's limit of {defaults.limit}")
    scores = [float(e["score"]) for e in train] if cfg.task == Task.STS else [1.0]
    p = {"model_dir": str(model_dir), "pooling": defaults.pooling, "normalize": defaults.normalize,
         "max_length": max_length, "labels": labels, "score_scale": max(max(scores), 1e-6),
         "fingerprint": models.fingerprint(model_dir), "anchors": anchors, "replay_digest": replay_digest,
         # fit() sends these to the workers with the examples, not inside every worker's config
         "dev_corpus": load_documents(cfg.dev_corpus) if cfg.dev_corpus else []}
    models.check_output(cfg.output, replace=True)  # a model there is replaced by the new one
    models.check_apart_from_model(cfg.output, cfg.model, model_dir)
    return p, train, dev


def _hold_out(train: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(dev, train): a seeded DEV_SHARE of train. For pairs, an anchor's examples stay on one
    side, so dev scores anchors the model never trained on (a claim that cites two abstracts)."""
    groups: dict[object, list[int]] = {}
    for i, e in enumerate(train):
        groups.setdefault(e["anchor"] if cfg.task == Task.PAIRS else i, []).append(i)
    order = list(groups.values())
    random.Random(cfg.seed).shuffle(order)
    cut = max(1, int(len(order) * DEV_SHARE))
    return [train[i] for g in order[:cut] for i in g], [train[i] for g in order[cut:] for i in g]


def _keep_labels_in_train(dev: list[dict], train: list[dict], cfg: TrainConfig) -> tuple[list, list]:
    """(dev, train) with every held-out example whose label (or NER tag) train would lack moved
    back to train: a label too rare to spare an example is trained on, not refused as a dev label
    the user never gave. A split where that happens to no example is unchanged."""
    if cfg.task not in (Task.CLASSIFICATION, Task.NER):
        return dev, train
    seen = set(label_set(train, [], cfg.task))
    back = [e for e in dev if not set(example_labels(cfg.task, e)) <= seen]
    if not back:
        return dev, train
    if len(back) == len(dev):
        raise ConfigError(f"train data {cfg.train!r} is too small to hold out dev examples of labels "
                          "it also trains on; give dev data (--dev)")
    return [e for e in dev if set(example_labels(cfg.task, e)) <= seen], train + back


def check_method(model_dir: Path, cfg: TrainConfig) -> None:
    """The method's options against the model's layers (freeze_layers, lora_targets), on a skeleton
    of the model without its weights: a bad option is one line here, not a failure in every
    worker after Ray started."""
    options = cfg.method_config()
    if not (cfg.method in (Method.ADAPTER, Method.LORA) or options.freeze_layers):
        return
    import torch
    from transformers import AutoConfig, AutoModel

    from semvec.train.methods import check

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    check(skeleton, cfg.method, options)


def _trained_labels(model_dir: Path, task: Task) -> list[str]:
    card = models.read_card(model_dir)
    if task not in (Task.CLASSIFICATION, Task.NER) or card is None or card.task != task.value:
        return []
    return list(card.labels)


def _replay(cfg: TrainConfig, n_new: int) -> tuple[list[dict], str | None]:
    """A seeded sample of past data, replay_share x the new examples (at most all of it), and a
    digest of all of it (EWC and distillation read the whole)."""
    if not cfg.replay:
        return [], None
    past = load_examples(cfg.task, cfg.replay, skip_blank=True)
    if not past:
        raise ConfigError(f"replay data {cfg.replay!r} holds no examples")
    k = min(len(past), round(cfg.replay_share * n_new))
    digest = hashlib.sha256(json.dumps(past, sort_keys=True, default=str).encode()).hexdigest()
    return (random.Random(cfg.seed + 1).sample(past, k) if k else []), digest


def _run_name(cfg: TrainConfig) -> str:
    return cfg.name or f"{cfg.task.value}-{cfg.method.value}-{Path(storage.strip(cfg.output)).name}"


def fit(cfg: TrainConfig, register: str | None = None, experiment: str = "semvec",
        restart_changed: bool = False) -> dict:
    """Train, export the best checkpoint to cfg.output, log to MLflow; returns a summary.
    `restart_changed`: an unfinished run of the same name with other settings starts afresh
    (retraining's own scratch runs) instead of being refused."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from semvec import tracking
    from semvec.cluster import check_local_resources, init_ray
    from semvec.train.loop import train_loop

    check_local_resources(f"training with {cfg.workers} workers", cfg.workers * (cfg.cpus_per_worker or 1),
                          cfg.workers if cfg.use_gpu else 0)
    if register is not None:
        tracking.check_model_name(register)
    p, train, dev = plan(cfg)
    name = _run_name(cfg)
    settings = settings_hash(cfg, p, train, dev)
    run_dir = storage.join(_checkpoint_root(cfg), name)
    record = _keep_or_clear_checkpoints(run_dir, settings, name, restart_changed)
    paths = {k: models.recorded(v) for k in RECORDED_PATHS if isinstance(v := getattr(cfg, k), str)}
    params = {**cfg.to_dict(), **paths, "base_fingerprint": p["fingerprint"], "train_examples": len(train),
              "dev_examples": len(dev), "dev_corpus_documents": len(p["dev_corpus"])}
    tracker = tracking.start_run(experiment, name, params, settings=settings,
                                 reuse_finished=record["finished"] or record.get("exported", False))
    crashpoints.arm()  # the test aid counts rank 0's stop note and the model's publish
    init_ray(crashpoints.worker_env())
    import ray

    primary = f"dev_{PRIMARY[cfg.task]}"
    storage_path = _checkpoint_root(cfg)
    storage_fs = _checkpoint_fs(storage_path)
    if storage_fs is not None:  # with an explicit filesystem, Ray takes the path without s3://
        storage_path = storage.strip(storage_path)
    cpus = _worker_cpus(cfg)
    dev_corpus = p.pop("dev_corpus")
    trainer = TorchTrainer(
        train_loop,
        # the examples go to the object store once, shared by the workers of a node, instead of
        # inside every worker's pickled config
        train_loop_config={"config": cfg.to_dict(), "plan": p, "examples": ray.put((train, dev, dev_corpus)),
                           "tracker": tracker, "threads": cpus,
                           "run_record": {"uri": storage.join(run_dir, RUN_RECORD), "record": record},
                           "verbose": log.isEnabledFor(logging.DEBUG)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=primary,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    stopped = _read_record(run_dir).get("stopped", {})
    nan = stopped.get("reason") == "nan_loss"
    best = _best(result, primary)
    if best is None:
        tracking.finish_run(tracker, Path(tempfile.mkdtemp()), {}, None, status="FAILED")
        raise JobFailed("training stopped before the first checkpoint"
                        + (f": the loss was not finite at step {stopped['step']} (a learning rate too "
                           "high, for one)" if nan else ""))
    if nan:
        log.warning("training stopped at step %s: the loss was not finite; the best checkpoint before "
                    "it is the model", stopped["step"])
    out, detail = export(cfg, p, best)
    card = models.read_card(out)
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report"
        try:
            write_report(report, cfg, _run_name(cfg), tracker, card.metrics, detail)
        except Exception as exc:  # noqa: BLE001 - the pictures never cost the model its run
            log.warning("the run's report folder is incomplete: %s", redact(f"{type(exc).__name__}: {exc}"))
        config = Path(d) / "train_config.json"
        config.write_text(json.dumps({**cfg.to_dict(), **paths}, indent=2))  # as the params: absolute
        # exported, before MLflow hears it: a rerun after a crash in finish_run (its run finished
        # there, say, and not here) reuses that run and its version
        _record_run(run_dir, settings, finished=False, stopped=stopped, exported=True)
        version = tracking.finish_run(tracker, out, {"report": report, "config": config}, register)
    _record_run(run_dir, settings, finished=True, stopped=stopped, exported=True)
    return {"output": str(out), "run_id": tracker.run_id, "registered_version": version,
            "nan_loss": nan, "best": card.metrics, "trainable_parameters": card.trainable_parameters,
            "total_parameters": card.total_parameters}


def _worker_cpus(cfg: TrainConfig) -> int:
    """CPUs (and torch threads) per worker: given, 1 beside a GPU, else the cluster's CPUs shared out."""
    import ray

    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    if cfg.use_gpu:
        return 1
    # one slot stays free for the Train controller and driver tasks; a worker fits on one node
    free = int(ray.cluster_resources().get("CPU", 1)) - 1
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
    return max(1, min(free // cfg.workers, largest))


RECORDED_PATHS = ("train", "dev", "dev_corpus", "replay", "output", "model")  # absolute in MLflow
# Beside a run's checkpoints: the settings they were made with, whether the run finished, and
# why training stopped early, when it did (rank 0's note: Ray Train keeps only reports with a
# checkpoint).
RUN_RECORD = "semvec-run.json"
# What may change between an interrupted run and its resumption: how it runs, not what it learns.
OPERATIONAL = ("name", "max_failures", "keep_checkpoints", "cpus_per_worker")


def settings_hash(cfg: TrainConfig, p: dict, train: list[dict], dev: list[dict]) -> str:
    """What the checkpoints of a run depend on: its settings, the base model's files and every
    example (train, dev, the dev corpus, the replay data), so a rerun resumes only the run it
    continues. By content, not path: a retraining round's data is merged into a new temporary
    file each time."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in cfg.to_dict().items() if k not in OPERATIONAL + RECORDED_PATHS}
    settings["lr"] = cfg.learning_rate  # unset or the default given: the same run
    for part in (settings, p["fingerprint"], train, dev, p["dev_corpus"], p["replay_digest"]):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _keep_or_clear_checkpoints(run_dir: str, settings: str, name: str, restart_changed: bool) -> dict:
    """Checkpoints under the run's name are resumed only when made with these settings and data.
    A finished run's (new data into the same output, say) are removed: this run starts afresh and
    replaces its model. An unfinished run of other settings that has checkpoints is refused, and
    they are kept (unless restart_changed). The run's record is written afresh before training: an
    earlier run's note of why it stopped goes; a finished run resumed stays finished. Returns it."""
    fs, root = storage.filesystem(run_dir), storage.strip(run_dir)
    held = [storage.basename(p) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    earlier = _read_record(run_dir) if held else {}
    if held and earlier.get("settings") != settings:
        progress = any(n.startswith("checkpoint_") for n in held)  # a stop before the first has none
        if progress and not earlier.get("finished") and not restart_changed:
            raise ConfigError(f"the checkpoints of an unfinished run named {name!r} "
                              f"({storage.display(run_dir)}) were made with other settings or data: rerun "
                              "with the same ones to resume it, give --name for a new run, or remove that "
                              "folder to start afresh")
        log.warning("semvec train: the checkpoints of the earlier run named %r (%s) are replaced: this "
                    "run has other settings or data", name,
                    "finished" if earlier.get("finished") else "unfinished")
        for entry in fs.ls(root, detail=False):  # the record last: cut short, a rerun decides again
            if storage.basename(entry) != RUN_RECORD:
                fs.rm(entry, recursive=True)
                crashpoints.wrote(f"train: removed {entry}")
        fs.rm(root, recursive=True)
    same = earlier.get("settings") == settings
    return _record_run(run_dir, settings, finished=same and bool(earlier.get("finished")),
                       exported=same and bool(earlier.get("exported")))


def _record_run(run_dir: str, settings: str, finished: bool, stopped: dict | None = None,
                exported: bool = False) -> dict:
    """finished: the model exported and logged to MLflow; exported: the model exported (its
    MLflow run may be finished too: a rerun reuses that run, whatever its state)."""
    record = {"settings": settings, "finished": finished, **({"exported": True} if exported else {}),
              **({"stopped": stopped} if stopped else {})}
    storage.put_atomic(storage.join(run_dir, RUN_RECORD), json.dumps(record).encode(),
                       what="train: run finished" if finished else "train: run record")
    return record


def _read_record(run_dir: str) -> dict:
    fs, path = storage.filesystem(run_dir), storage.strip(storage.join(run_dir, RUN_RECORD))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def _checkpoint_root(cfg: TrainConfig) -> str:
    out = cfg.output.rstrip("/")
    return out + "-checkpoints" if storage.is_remote(out) else str(Path(out).resolve()) + "-checkpoints"


def _checkpoint_fs(root: str):
    """Checkpoints on s3:// go through semvec's own filesystem (credentials and endpoint from the
    driver's AWS environment), so S3-compatible stores work and workers need no AWS settings."""
    if not storage.is_remote(root):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(storage.filesystem(root)))


def _best(result, primary: str):
    ranked = [(m.get(primary, float("-inf")), c) for c, m in (result.best_checkpoints or [])]
    return max(ranked, key=lambda x: x[0])[1] if ranked else None


def export(cfg: TrainConfig, p: dict, checkpoint) -> tuple[Path, dict]:
    """The best checkpoint -> a model directory that semvec embed and sentence-transformers load;
    returns it and the checkpoint's per-label report on dev (classification and NER, else {})."""
    from safetensors.torch import save_file

    from semvec.train.loop import STATE, build_model, load_state
    from semvec.train.methods import count_parameters, export_model

    model, tok = build_model(cfg, p)
    with checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE)
    model.load_state_dict(state["model"])
    trainable, total = count_parameters(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        method_info = export_model(model.encoder, out)
        tok.save_pretrained(out)
        if model.head is not None:
            save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
                      out / HEAD_FILE)
        normalize = p["normalize"] or cfg.task in (Task.STS, Task.PAIRS)
        models.write_card(out, models.ModelCard(
            pooling=p["pooling"], normalize=normalize, max_length=p["max_length"], task=cfg.task.value,
            labels=p["labels"], base_model=models.recorded(cfg.model), base_fingerprint=p["fingerprint"],
            method=method_info, metrics=state["metrics"], trainable_parameters=trainable,
            total_parameters=total))
        models.write_sentence_transformers_files(out, p["pooling"], normalize, p["max_length"], model.hidden)
        models.check_output(cfg.output, replace=True)  # again: hours may have passed since the plan
        models.publish(out, cfg.output)
    out = Path(storage.strip(cfg.output)) if not storage.is_remote(cfg.output) else Path(
        models.resolve_model(cfg.output))
    return out, state.get("dev_detail") or {}
