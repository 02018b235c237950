"""The backfill job: plan on the driver (all checks, before Ray), then run the Ray Data pipeline.

    plan (checks) -> lease on the output -> what is done (from committed parts) -> Ray
    -> read (tasks) -> tokenize (tasks) -> encode (actor pool) -> write (tasks) -> counts to driver
    -> accounting from committed parts -> manifest -> lease released

The commit protocol that makes every row land exactly once is described on `stages.Writer`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from semvec import __version__, crashpoints, models, storage
from semvec.backfill.manifest import LEASE, OutputDir, now
from semvec.backfill.read import detect_format
from semvec.cluster import init_ray
from semvec.config import EmbedConfig, Granularity, InputFormat, Pooling
from semvec.errors import ConfigError, JobFailed, OutputMismatch
from semvec.lease import Lease
from semvec.storage import InputFile

log = logging.getLogger("semvec.backfill")

# Read, tokenize and write are light: they claim no CPU, so the encoder actors may take every
# CPU of a node and no IO task ever waits behind them (an actor restarted after a node is lost
# cannot take the slot the writers need). Each IO stage runs at most this many tasks per actor.
IO_TASKS_PER_ACTOR = 1
# The failure share is judged mid-run once this many rows have reached the model.
FAIL_CHECK_ROWS = 1000


@dataclass
class Plan:
    config: EmbedConfig
    files: list[InputFile]
    model_dir: str
    fingerprint: str
    pooling: str
    normalize: bool
    max_length: int
    dim: int
    config_hash: str
    done: dict[str, np.ndarray] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)  # inputs finished by an earlier run


def plan(config: EmbedConfig) -> Plan:
    """Check everything that can be checked before Ray starts; raise ConfigError otherwise."""
    files = storage.list_inputs(config.input)
    for f in files:
        if detect_format(f.relative, config.input_format) is None:
            allowed = ", ".join(x.value for x in InputFormat if x != InputFormat.AUTO)
            raise ConfigError(
                f"input file {f.relative!r} has an unknown format; name it .jsonl/.parquet/.csv/"
                f".tsv/.txt (optionally .gz) or set input_format to one of: {allowed}"
            )
    if all(f.size == 0 for f in files):
        raise ConfigError(f"input {storage.display(config.input)!r} holds only empty files")
    model_dir = models.resolve_model(config.model)
    dim = _check_loadable(model_dir, config)
    defaults = models.model_defaults(model_dir)
    pooling = defaults.pooling if config.pooling == Pooling.AUTO else config.pooling.value
    normalize = defaults.normalize if config.normalize is None else config.normalize
    max_length = config.max_length or defaults.max_length
    if max_length > defaults.limit:
        raise ConfigError(f"max_length {max_length} exceeds the model's limit of {defaults.limit}")
    fingerprint = models.fingerprint(model_dir)
    p = Plan(config, files, str(model_dir), fingerprint, pooling, normalize, max_length, dim,
             config.output_hash(fingerprint))
    storage.check_writable(config.output)
    _check_output(p)
    return p


def _check_loadable(model_dir, config: EmbedConfig) -> int:
    from transformers import AutoConfig

    from semvec.encode import load_tokenizer

    try:
        hf = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=config.trust_remote_code)
        load_tokenizer(model_dir, config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the model is unusable
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ConfigError(
            f"model {config.model!r} cannot be loaded ({type(exc).__name__}: {first})"
        ) from None
    return int(hf.hidden_size)


def _check_output(p: Plan) -> None:
    """Refuse a foreign or differently configured prefix (a read only: nothing is held yet)."""
    out = OutputDir(p.config.output)
    manifest = out.read_manifest()
    if p.config.overwrite:
        return
    if manifest is None:
        if out.list_parts() or out.has_foreign_files():
            raise ConfigError(
                f"output {storage.display(p.config.output)!r} is not empty and holds no semvec "
                "manifest; choose an empty prefix or pass --overwrite"
            )
        return
    if manifest.get("config_hash") != p.config_hash:
        raise OutputMismatch(
            f"output {storage.display(p.config.output)!r} was written with another model or "
            f"config (hash {manifest.get('config_hash')} != {p.config_hash}); pass --overwrite "
            "to replace it, or choose another output"
        )


def _prepare_output(p: Plan) -> None:
    """Under the lease: clear (overwrite) or find what is done, from the committed parts."""
    out = OutputDir(p.config.output)
    if p.config.overwrite:
        out.clear()
        return
    _check_output(p)  # again, under the lease: a run that just ended may have changed it
    out.remove_temporaries()
    manifest = out.read_manifest() or {}
    finished = {i["source"]: i for i in manifest.get("inputs", []) if i.get("complete")}
    known = {i["source"]: i.get("version") for i in manifest.get("inputs", [])}
    for f in p.files:
        prior = finished.get(f.relative)
        if prior and prior.get("version") == f.version:
            p.skip.add(f.relative)  # its parts are all there: counted again at the end
            continue
        if f.relative in known and known[f.relative] != f.version:
            out.drop_parts_of(f.relative)  # the file changed since: its old vectors are stale
            continue
        done = out.done_rows(f.relative)
        if len(done):
            p.done[f.relative] = done


def _manifest(p: Plan, status: str, started: str, accounting: dict | None = None,
              timings: dict | None = None) -> dict:
    c = p.config
    inputs = []
    for f in p.files:
        entry = {"source": f.relative, "uri": storage.display(f.uri), "size": f.size,
                 "version": f.version, "complete": False}
        if accounting is not None:
            a = accounting["inputs"].get(f.relative)
            embedded, quarantined = (a["embedded"], a["quarantined"]) if a else (0, 0)
            entry.update(rows=embedded + quarantined, embedded=embedded, quarantined=quarantined,
                         quarantine_reasons=dict(a["reasons"]) if a else {},
                         outputs=sorted(a["outputs"]) if a else [], complete=True)
        inputs.append(entry)
    totals = None
    if accounting is not None:
        totals = {k: sum(i[k] for i in inputs) for k in ("rows", "embedded", "quarantined")}
    return {
        "semvec_version": __version__,
        "status": status,
        "config_hash": p.config_hash,
        "config": {k: v for k, v in c.to_dict().items() if k not in ("overwrite",)},
        "model": {"reference": storage.display(c.model), "fingerprint": p.fingerprint,
                  "pooling": p.pooling, "normalize": p.normalize, "max_length": p.max_length,
                  "dim": p.dim, "dtype": c.dtype.value},
        "granularity": c.granularity.value,
        "inputs": inputs,
        "totals": totals,
        "duplicates": accounting["duplicates"] if accounting else None,
        "started_at": started,
        "finished_at": now() if status == "complete" else None,
        "timings": timings or {},
    }


def _worker_cpus(config: EmbedConfig) -> float:
    import ray

    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    if config.num_gpus_per_worker > 0:
        return 1.0
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    return float(max(1, min(2, int(largest))))


def _pool_size(config: EmbedConfig, cpus: float) -> tuple[int, int]:
    """(min, max) encoder actors. With GPUs and max_workers given, GPU nodes need not be up yet:
    the pool starts when the autoscaler brings the first one, and grows as more arrive."""
    import ray

    resources = ray.cluster_resources()
    if config.num_gpus_per_worker > 0:
        present = int(resources.get("GPU", 0) // config.num_gpus_per_worker)
        if present < 1 and not config.max_workers:
            raise ConfigError(
                f"num_gpus_per_worker {config.num_gpus_per_worker} but the cluster has "
                f"{resources.get('GPU', 0)} GPUs now; on an autoscaling cluster give max_workers"
            )
        high = config.max_workers or present
        low = config.min_workers or max(1, min(present, high))
        return min(low, high), high
    most = max(1, int(resources.get("CPU", 1) // cpus))
    high = config.max_workers or most
    low = config.min_workers or high
    return min(low, high), high


def run(config: EmbedConfig) -> dict:
    """Plan, then run the backfill; returns the summary (also printed)."""
    t0 = time.time()
    p = plan(config)
    crashpoints.arm()
    with Lease(config.output, LEASE, what="backfill", ttl_s=config.lease_ttl_s) as lease:
        _prepare_output(p)
        return _run_held(p, lease, t0)


def _run_held(p: Plan, lease: Lease, t0: float) -> dict:
    config = p.config
    started = now()
    out = OutputDir(config.output)
    todo = [f for f in p.files if f.relative not in p.skip]
    pool = None
    if todo:
        init_ray(crashpoints.worker_env())
        pool = _pool(config)  # may refuse (too few GPUs) before anything is written
    out.write_manifest(_manifest(p, "running", started))
    t_plan = time.time() - t0
    try:
        rows_this_run = _execute(p, todo, pool, lease) if todo else 0
    except _Stopped as stop:
        out.write_manifest({**_manifest(p, "failed", started), "error": str(stop)})
        raise JobFailed(str(stop)) from None
    t_run = time.time() - t0 - t_plan
    accounting = out.account(p.files)
    timings = {"plan_s": round(t_plan, 2), "run_s": round(t_run, 2),
               "total_s": round(time.time() - t0, 2)}
    failed = _failure(accounting, config.max_failed_share)
    manifest = _manifest(p, "failed" if failed else "complete", started, accounting, timings)
    if failed:
        manifest["error"] = failed
    out.write_manifest(manifest)
    if failed:
        raise JobFailed(failed)
    seconds = time.time() - t0
    return {
        "output": storage.display(config.output),
        **manifest["totals"],
        "rows_this_run": rows_this_run,
        "skipped_inputs": len(p.skip),
        "duplicate_ids": manifest["duplicates"]["count"],
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows_this_run / seconds, 1) if seconds > 0 else 0.0,
    }


class _Stopped(Exception):
    """Raised mid-run when too many rows fail: the job stops with what is committed."""


def _failure(accounting: dict, max_share: float) -> str | None:
    """Why the output is a failure (too many rows the model could not embed), or None."""
    failed = sum(a["reasons"].get("encode_failed", 0) for a in accounting["inputs"].values())
    tried = failed + sum(a["embedded"] for a in accounting["inputs"].values())
    return _too_many_failed(failed, tried, max_share)


def _too_many_failed(failed: int, tried: int, max_share: float) -> str | None:
    if tried and failed / tried > max_share:
        return (f"{failed} of {tried} rows given to the model failed to embed (encode_failed, "
                f"{failed / tried:.1%} > max_failed_share {max_share:.1%}); see _quarantine/ for "
                "the errors")
    return None


def _pool(c: EmbedConfig) -> tuple[float, int, int]:
    cpus = _worker_cpus(c)
    return (cpus, *_pool_size(c, cpus))


def _execute(p: Plan, todo: list[InputFile], pool: tuple[float, int, int], lease: Lease) -> int:
    import json

    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from semvec.backfill.stages import CorpusSource, EncodeActor, Tokenize, Writer

    c = p.config
    cpus, low, high = pool
    threads = c.threads_per_worker or max(1, math.floor(cpus))
    token_mode = c.granularity == Granularity.TOKEN
    encoder_cfg = {
        "granularity": c.granularity.value, "pooling": p.pooling, "normalize": p.normalize,
        "max_length": p.max_length, "dtype": c.dtype.value, "batch_tokens": c.batch_tokens,
        "trust_remote_code": c.trust_remote_code,
    }
    io = {"num_cpus": 0, "compute": TaskPoolStrategy(size=max(2, high * IO_TASKS_PER_ACTOR))}
    ds = ray.data.read_datasource(CorpusSource(todo, c, p.done), **io)
    ds = ds.map_batches(
        Tokenize(p.model_dir, p.max_length, c.granularity.value, c.trust_remote_code),
        batch_size=c.batch_rows, batch_format="pyarrow", **io,
    )
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"model_dir": p.model_dir, "config": encoder_cfg, "threads": threads},
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        batch_size=c.batch_rows, batch_format="pyarrow",
        num_cpus=cpus, num_gpus=c.num_gpus_per_worker or None,
    )
    ds = ds.map_batches(Writer(c.output, token_mode), batch_size=c.rows_per_file,
                        batch_format="pyarrow", **io)
    rows = embedded = failed = 0
    for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += int(sum(stats["embedded"].to_pylist()) + sum(stats["quarantined"].to_pylist()))
        embedded += int(sum(stats["embedded"].to_pylist()))
        failed += sum(json.loads(r).get("encode_failed", 0) for r in stats["reasons"].to_pylist())
        if lease.lost.is_set():
            raise JobFailed(f"the lease on {storage.display(c.output)} was lost to another run; "
                            "stopped so that two runs do not write one prefix")
        if embedded + failed >= FAIL_CHECK_ROWS:
            reason = _too_many_failed(failed, embedded + failed, c.max_failed_share)
            if reason:  # what is committed stays (a rerun resumes); the rest is not tried
                raise _Stopped(reason)
    return rows


def print_summary(summary: dict, stream=sys.stdout) -> None:
    print(
        f"semvec embed: {summary['rows']} rows in -> {summary['embedded']} embedded, "
        f"{summary['quarantined']} quarantined ({summary['duplicate_ids']} duplicate ids); "
        f"{summary['rows_this_run']} rows this run in {summary['seconds']} s "
        f"({summary['rows_per_s']} rows/s); output {summary['output']}",
        file=stream,
    )
