"""The Ray Data pipeline of a backfill: the stages wired together, the encoder pool sized, and the
writers' counts consumed on the driver as they commit (progress, the failure threshold, the lease,
store failures).

    read (tasks) -> tokenize (tasks) -> encode (actor pool) -> write (tasks) -> counts to driver
"""

from __future__ import annotations

import json
import logging
import math

from semvec.backfill import store_errors
from semvec.backfill.progress import Progress, estimate_rows
from semvec.backfill.read import detect_format
from semvec.cluster import quiet_ray_data
from semvec.config import Aggregate, EmbedConfig, Granularity
from semvec.errors import ConfigError, JobFailed
from semvec.storage import InputFile, display

log = logging.getLogger("semvec.backfill")

# Read, tokenize and write are light: they claim no CPU, so the encoder actors may take every
# CPU of a node and no IO task ever waits behind them (an actor restarted after a node is lost
# cannot take the slot the writers need). Each IO stage runs at most this many tasks per actor.
IO_TASKS_PER_ACTOR = 1
# The failure share is judged mid-run once this many rows have reached the model.
FAIL_CHECK_ROWS = 1000

# counted against max_failed_share: rows the model (or its tokenizer) was given and refused
FAILURE_REASONS = ("encode_failed", "tokenize_failed")


class Stopped(Exception):
    """Raised mid-run when too many rows fail or the store fails: the job stops with what is
    committed, and a rerun goes on from there."""


def lease_lost(output: str) -> JobFailed:
    return JobFailed(f"the lease on {display(output)} was lost to another run; "
                     "stopped so that two runs do not write one prefix")


def too_many_failed(failed: int, tried: int, max_share: float) -> str | None:
    if tried and failed / tried > max_share:
        return (f"{failed} of {tried} rows given to the model failed (encode_failed or tokenize_failed, "
                f"{failed / tried:.1%} > max_failed_share {max_share:.1%}); see _quarantine/ for "
                "the errors")
    return None


def pool_for(c: EmbedConfig) -> tuple[float, int, int]:
    cpus = _worker_cpus(c)
    return (cpus, *_pool_size(c, cpus))


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


def execute(p, todo: list[InputFile], pool: tuple[float, int, int], lease) -> int:
    """Run the pipeline over the files still to do (p: the job's Plan); returns the rows read.

    Raises Stopped (too many failed rows, or a store that fails past its retries: what is committed
    stays and a rerun goes on from there) or JobFailed (the lease was lost)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from semvec.backfill.stages import CorpusSource, EncodeActor, Tokenize, Writer

    c = p.config
    cpus, low, high = pool
    threads = c.threads_per_worker or max(1, math.floor(cpus))
    encoder_cfg = {
        "granularity": c.granularity.value, "pooling": p.pooling, "normalize": p.normalize,
        "max_length": p.max_length, "dtype": p.precision[0], "batch_tokens": c.batch_tokens,
        "trust_remote_code": c.trust_remote_code,
        "chunked": c.chunk_tokens is not None, "aggregate": c.aggregate.value,
    }
    quiet_ray_data()
    io = {"num_cpus": 0, "compute": TaskPoolStrategy(size=max(2, high * IO_TASKS_PER_ACTOR))}
    ds = ray.data.read_datasource(CorpusSource(todo, c, p.done), **io)
    ds = ds.map_batches(
        Tokenize(p.model_dir, p.tokenizer, p.max_length, c.granularity.value, c.trust_remote_code,
                 (c.chunk_tokens, c.chunk_overlap) if c.chunk_tokens else None),
        batch_size=c.batch_rows, batch_format="pyarrow", **io,
    )
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"model_dir": p.model_dir, "config": encoder_cfg, "threads": threads},
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        batch_size=c.batch_rows, batch_format="pyarrow",
        num_cpus=cpus, num_gpus=c.num_gpus_per_worker or None,
    )
    chunked = c.chunk_tokens is not None
    writer = Writer(c.output, c.granularity == Granularity.TOKEN,
                    chunks=chunked and c.aggregate == Aggregate.NONE,
                    aggregated=chunked and c.aggregate == Aggregate.MEAN)
    ds = ds.map_batches(writer, batch_size=c.rows_per_file, batch_format="pyarrow", **io)
    expected = estimate_rows(todo, detect_format(todo[0].relative, c.input_format) if todo else None)
    if expected is not None:
        expected = max(0, expected - sum(len(done) for done in p.done.values()))
    progress = Progress(expected)
    log.info("embedding %d input(s)%s with %d-%d encoder actor(s)", len(todo),
             f", ~{expected:,} rows" if expected else "", low, high)
    store_errors.keep_ray_tracebacks_quiet()
    try:
        _consume(ds, c, lease, progress)
    except (Stopped, JobFailed):
        raise
    except Exception as exc:
        store = store_errors.found_in(exc)
        if store is None:
            raise
        # Not the file's fault, so not quarantined: the file stays undone for the rerun.
        raise Stopped(f"{store_errors.message_of(store)}; what was committed stays, a rerun "
                      "reads the rest once the store answers") from None
    return progress.rows


def _consume(ds, c: EmbedConfig, lease, progress: Progress) -> None:
    """The writers' counts as each part commits: progress, the lease, the failure threshold."""
    failed = 0
    for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.update(int(sum(stats["embedded"].to_pylist())), int(sum(stats["quarantined"].to_pylist())))
        failed += sum(json.loads(r).get(k, 0) for r in stats["reasons"].to_pylist() for k in FAILURE_REASONS)
        if lease.lost.is_set() and not lease.holds():
            raise lease_lost(c.output)
        tried = progress.embedded + failed
        if tried >= FAIL_CHECK_ROWS:
            reason = too_many_failed(failed, tried, c.max_failed_share)
            if reason:  # what is committed stays (a rerun resumes); the rest is not tried
                raise Stopped(reason)
