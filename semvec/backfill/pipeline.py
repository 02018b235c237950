"""The Ray Data pipeline of a backfill: the stages wired together, the encoder pool sized, and the
writers' counts consumed on the driver as they commit (progress, the failure threshold, the lease,
store failures).

    read (tasks) -> tokenize (tasks) -> encode (actor pool) -> write (tasks) -> counts to driver

and the same stages one batch after another in the driver's process, for a job too small to gain
from Ray (`execute_here`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math

import pyarrow as pa

from semvec.backfill import store_errors
from semvec.backfill.progress import Progress, estimate_rows
from semvec.backfill.read import detect_format
from semvec.cluster import on_a_cluster, quiet_ray_data
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


def expected_rows(p, todo: list[InputFile]) -> int | None:
    """Rows still to embed, estimated (None when it cannot be told)."""
    c = p.config
    expected = estimate_rows(todo, detect_format(todo[0].relative, c.input_format) if todo else None)
    if expected is None:
        return None
    return max(0, expected - sum(len(done) for done in p.done.values()))


def runs_here(c: EmbedConfig, expected: int | None) -> bool:
    """Whether the job runs in this process without Ray (see EmbedConfig.ray_from_rows): not on a
    cluster, on CPUs, and fewer rows than ray_from_rows (as estimated)."""
    return (not on_a_cluster() and not c.num_gpus_per_worker
            and expected is not None and expected < c.ray_from_rows)


def _stages(p, threads: int | None) -> tuple:
    """(tokenize, encoder arguments, writer): the stages both ways of running use."""
    from semvec.backfill.stages import Tokenize, Writer

    c = p.config
    tokenize = Tokenize(p.model_dir, p.tokenizer, p.max_length, c.granularity.value,
                        c.trust_remote_code, (c.chunk_tokens, c.chunk_overlap) if c.chunk_tokens else None)
    encoder = {"model_dir": p.model_dir, "threads": threads, "config": {
        "granularity": c.granularity.value, "pooling": p.pooling, "normalize": p.normalize,
        "max_length": p.max_length, "dtype": p.precision[0], "batch_tokens": c.batch_tokens,
        "trust_remote_code": c.trust_remote_code,
        "chunked": c.chunk_tokens is not None, "aggregate": c.aggregate.value,
    }}
    chunked = c.chunk_tokens is not None
    writer = Writer(c.output, c.granularity == Granularity.TOKEN,
                    chunks=chunked and c.aggregate == Aggregate.NONE,
                    aggregated=chunked and c.aggregate == Aggregate.MEAN)
    return tokenize, encoder, writer


def execute(p, todo: list[InputFile], pool: tuple[float, int, int], lease, expected: int | None) -> int:
    """Run the pipeline on Ray over the files still to do (p: the job's Plan; expected: the rows
    estimated for the progress line); returns the rows read.

    Raises Stopped (too many failed rows, or a store that fails past its retries: what is committed
    stays and a rerun goes on from there) or JobFailed (the lease was lost)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from semvec.backfill.stages import CorpusSource, EncodeActor

    c = p.config
    cpus, low, high = pool
    tokenize, encoder, writer = _stages(p, c.threads_per_worker or max(1, math.floor(cpus)))
    quiet_ray_data()
    io = {"num_cpus": 0, "compute": TaskPoolStrategy(size=max(2, high * IO_TASKS_PER_ACTOR))}
    ds = ray.data.read_datasource(CorpusSource(todo, c, p.done), **io)
    ds = ds.map_batches(tokenize, batch_size=c.rows_per_batch, batch_format="pyarrow", **io)
    ds = ds.map_batches(
        EncodeActor, fn_constructor_kwargs=encoder,
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        batch_size=c.rows_per_batch, batch_format="pyarrow",
        num_cpus=cpus, num_gpus=c.num_gpus_per_worker or None,
    )
    ds = ds.map_batches(writer, batch_size=c.rows_per_file, batch_format="pyarrow", **io)
    tally = Tally(c, lease, expected)
    log.info("embedding %d input(s)%s with %d-%d encoder actor(s)", len(todo), tally.about(), low, high)
    store_errors.keep_ray_tracebacks_quiet()
    with _stopping_on_store_errors():
        for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tally.add(stats)
    return tally.progress.rows


def execute_here(p, todo: list[InputFile], lease, expected: int | None) -> int:
    """execute()'s stages, one batch after another in this process, without Ray (a small job
    started without a cluster: see runs_here). The same read, tokenize, encode and write code, so
    the same parts and the same commit protocol; the same errors and the same stops."""
    from semvec.backfill.stages import CorpusSource, EncodeActor

    c = p.config
    tokenize, encoder, writer = _stages(p, c.threads_per_worker)
    # on the CPU, as an actor that asks for no GPU runs on Ray (its precision was chosen for it)
    encoder["config"]["device"] = "cpu"
    tally = Tally(c, lease, expected)
    log.info("embedding %d input(s)%s in this process (fewer rows than ray_from_rows %d)",
             len(todo), tally.about(), c.ray_from_rows)
    with _stopping_on_store_errors():
        encode = EncodeActor(**encoder)
        read = (block for reader in CorpusSource(todo, c, p.done).readers() for block in reader())
        encoded = (encode(tokenize(batch)) for batch in _rebatch(read, c.rows_per_batch))
        for batch in _rebatch(encoded, c.rows_per_file):
            tally.add(writer(batch))
    return tally.progress.rows


def _rebatch(tables, rows: int):
    """The tables' rows again, in tables of `rows` rows (the last one may hold fewer), as Ray
    Data's batch_size hands them to a stage."""
    held, count = [], 0
    for table in tables:
        while table.num_rows:
            take = table.slice(0, rows - count)
            held.append(take)
            count += take.num_rows
            table = table.slice(take.num_rows)
            if count == rows:
                yield pa.concat_tables(held)
                held, count = [], 0
    if count:
        yield pa.concat_tables(held)


@contextlib.contextmanager
def _stopping_on_store_errors():
    try:
        yield
    except (Stopped, JobFailed):
        raise
    except Exception as exc:
        store = store_errors.found_in(exc)
        if store is None:
            raise
        # Not the file's fault, so not quarantined: the file stays undone for the rerun.
        raise Stopped(f"{store_errors.message_of(store)}; what was committed stays, a rerun "
                      "reads the rest once the store answers") from None


class Tally:
    """The writers' counts as each part commits: progress, the lease, the failure threshold."""

    def __init__(self, c: EmbedConfig, lease, expected: int | None):
        self.c, self.lease, self.failed = c, lease, 0
        self.progress = Progress(expected)

    def about(self) -> str:
        return f", ~{self.progress.expected:,} rows" if self.progress.expected else ""

    def add(self, stats) -> None:
        c, progress = self.c, self.progress
        progress.update(int(sum(stats["embedded"].to_pylist())), int(sum(stats["quarantined"].to_pylist())))
        self.failed += sum(json.loads(r).get(k, 0) for r in stats["reasons"].to_pylist()
                           for k in FAILURE_REASONS)
        if self.lease.lost.is_set() and not self.lease.holds():
            raise lease_lost(c.output)
        tried = progress.embedded + self.failed
        if tried >= FAIL_CHECK_ROWS:
            reason = too_many_failed(self.failed, tried, c.max_failed_share)
            if reason:  # what is committed stays (a rerun resumes); the rest is not tried
                raise Stopped(reason)
