"""The backfill job: plan on the driver (all checks, before Ray), then run the Ray Data pipeline.

    plan (checks) -> lease on the output -> what is done (from committed parts) -> Ray
    -> read (tasks) -> tokenize (tasks) -> encode (actor pool) -> write (tasks) -> counts to driver
    -> accounting from committed parts -> manifest -> lease released

A small job started without a cluster runs the same stages in this process instead of on Ray
(`pipeline.runs_here`, `execute_here`). The commit protocol that makes every row land exactly
once is described on `stages.Writer`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from semvec import __version__, crashpoints, models, precision, storage, tokens
from semvec.backfill.manifest import LEASE, OutputDir, now
from semvec.backfill.pipeline import (
    FAILURE_REASONS,
    Stopped,
    execute,
    execute_here,
    expected_rows,
    lease_lost,
    pool_for,
    runs_here,
    too_many_failed,
)
from semvec.backfill.read import RowParser, detect_format, has_rows, require_fields
from semvec.backfill.stages import source_key
from semvec.chunking import check_windows
from semvec.cluster import check_local_resources, init_ray, quiet_worker_env
from semvec.config import EmbedConfig, InputFormat, Pooling
from semvec.errors import ConfigError, JobFailed, OutputMismatch
from semvec.lease import Lease
from semvec.storage import InputFile

log = logging.getLogger("semvec.backfill")


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
    tokenizer: tokens.ModelFacts  # the tokenize tasks' tokenizer, without transformers where it can
    done: dict[str, np.ndarray] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)  # inputs finished by an earlier run
    # (dtype, why) the encoders run: config.dtype resolved on a node of the pool's kind
    # (semvec.precision), or an earlier run's when this one has nothing to embed
    precision: tuple[str, str] | None = None
    here: bool | None = None  # this run embeds in this process, without Ray (None: nothing to embed)


def plan(config: EmbedConfig) -> Plan:
    """Check everything that can be checked before Ray starts; raise ConfigError otherwise."""
    # the actors the pool starts with must fit a local Ray (a cluster may still bring them)
    check_local_resources(f"an encoder pool of {config.min_workers}",
                          (config.cpus_per_worker or 0) * config.min_workers,
                          config.num_gpus_per_worker * config.min_workers)
    files = storage.list_inputs(config.input)
    _check_apart(config.input, config.output)
    for f in files:
        if detect_format(f.relative, config.input_format) is None:
            allowed = ", ".join(x.value for x in InputFormat if x != InputFormat.AUTO)
            raise ConfigError(
                f"input file {f.relative!r} has an unknown format; name it .jsonl/.parquet/.csv/"
                f".tsv/.txt (optionally .gz) or set input_format to one of: {allowed}"
            )
    # a field of a row that has none was ignored (its id FILE:ROW, no title)
    named = [f"--{n.replace('_', '-')}" for n in ("id_field", "title_field") if getattr(config, n)]
    if named and all(detect_format(f.relative, config.input_format) == InputFormat.TXT for f in files):
        raise ConfigError(f"input {storage.display(config.input)!r} is text, a line a row, with no "
                          f"fields: {named[0]} needs jsonl, csv, tsv or parquet (a text file's rows "
                          "are named FILE:ROW)")
    if all(f.size == 0 for f in files):
        raise ConfigError(f"input {storage.display(config.input)!r} holds only empty files")
    first = next(f for f in files if f.size)
    require_fields(first, detect_format(first.relative, config.input_format), config.text_field, "input",
                   id_field=config.id_field, title_field=config.title_field)
    storage.check_writable(config.output)  # before a model is fetched from a store or a registry
    model_dir = models.resolve_model(config.model)
    fingerprint = models.fingerprint(model_dir)
    static = models.model_kind(model_dir) == models.ModelKind.STATIC  # a token table, no config.json
    facts = tokens.describe(model_dir, fingerprint, config.model,
                            models.static_dim(model_dir) if static else None, config.trust_remote_code)
    defaults = models.model_defaults(model_dir)
    pooling = defaults.pooling if config.pooling == Pooling.AUTO else config.pooling.value
    normalize = defaults.normalize if config.normalize is None else config.normalize
    max_length = config.max_length or defaults.max_length
    if max_length > defaults.limit:
        raise ConfigError(f"max_length {max_length} exceeds the model's limit of {defaults.limit}")
    if config.chunk_tokens is not None:  # the window against this model's length and specials
        check_windows(facts.tokenizer(model_dir, config.trust_remote_code), config.chunk_tokens,
                      config.chunk_overlap, max_length)
    p = Plan(config, files, str(model_dir), fingerprint, pooling, normalize, max_length, facts.dim,
             config.output_hash(fingerprint), tokenizer=facts)
    _check_output(p)
    return p


def _check_apart(input_: str, output: str) -> None:
    """Refuse an output that is the input, lies in its folder, holds it, or matches its glob: a
    rerun would read the output's parts as input, and --overwrite would remove what is there."""
    storage.check_apart(input_, output, "output", source_what="the input", holding=True)
    if storage.glob_lists(input_, f"{output.rstrip('/')}/part-{'0' * 12}-{'0' * 12}-{'0' * 12}.parquet"):
        raise ConfigError(f"output {storage.display(output)!r} lies among the input "
                          f"{storage.display(input_)!r}: its parts would be read as input; "
                          "choose a folder of its own")


def _check_output(p: Plan) -> dict[str, list[str]]:
    """Refuse a foreign or differently configured prefix (a read only: nothing is held yet);
    returns its committed parts by source key (none under --overwrite, which clears them)."""
    out = OutputDir(p.config.output)
    manifest = out.read_manifest()
    if p.config.overwrite:
        return {}
    parts = out.parts_by_source()
    if manifest is None:
        if parts or out.has_foreign_files():
            # parts without their manifest: an --overwrite cut short (the manifest goes first), which
            # a retraining round's own prefix then clears again; anything else is not semvec's
            error = OutputMismatch if parts else ConfigError
            raise error(f"output {storage.display(p.config.output)!r} is not empty and holds no semvec "
                        "manifest; choose an empty prefix or pass --overwrite")
        return parts
    if manifest.get("config_hash") != p.config_hash:
        raise OutputMismatch(
            f"output {storage.display(p.config.output)!r} was written with another model or "
            f"config (hash {manifest.get('config_hash')} != {p.config_hash}); pass --overwrite "
            "to replace it, or choose another output"
        )
    _refuse_other_inputs(p, set(parts), manifest)
    return parts


def _refuse_other_inputs(p: Plan, sources: set[str], manifest: dict) -> None:
    """Parts of inputs that this run does not list (another input, or files gone from it) would
    stay in the output uncounted, mixed with this input's vectors: refused, nothing removed."""
    others = sources - {source_key(f.relative) for f in p.files}
    if not others:
        return
    named = sorted(i["source"] for i in manifest.get("inputs", []) if source_key(i["source"]) in others)
    example = f" (e.g. {named[0]!r})" if named else ""
    raise OutputMismatch(
        f"output {storage.display(p.config.output)!r} holds vectors of {len(others)} input file(s) "
        f"that are not in input {storage.display(p.config.input)!r}{example}; an output holds one "
        "input's vectors: give an input that lists them too (files done are skipped), pass "
        "--overwrite to replace them, or choose another output"
    )


def _prepare_output(p: Plan) -> None:
    """Under the lease: clear (overwrite) or find what is done, from the committed parts."""
    out = OutputDir(p.config.output)
    if p.config.overwrite:
        out.clear()
        return
    parts = _check_output(p)  # again, under the lease: a run that just ended may have changed it
    out.remove_temporaries()
    manifest = out.read_manifest() or {}
    earlier = manifest.get("model") or {}
    if earlier.get("dtype_reason"):
        p.precision = (earlier["dtype"], earlier["dtype_reason"])
    finished = {i["source"]: i for i in manifest.get("inputs", []) if i.get("complete")}
    known = {i["source"]: (i.get("version"), i.get("size")) for i in manifest.get("inputs", [])}
    for f in p.files:
        mine = parts.get(source_key(f.relative), [])
        # the file changed since: its old vectors are stale. The size too, for a local file copied
        # with its mtime kept (cp -p, rsync -a, tar) and rows appended or edited
        if f.relative in known and known[f.relative] not in ((f.version, f.size), (f.version, None)):
            out.remove(mine)
            continue
        done = out.done_rows(mine)
        prior = finished.get(f.relative)
        if prior and len(done) == prior.get("rows"):
            p.skip.add(f.relative)  # its parts are all there: counted again at the end
            continue
        if prior:  # finished once, but parts of it are gone since: its missing rows are read again
            log.warning("input %r was complete but %d of its %s rows are in no part now; "
                        "reading it again for them", f.relative, prior.get("rows", 0) - len(done),
                        prior.get("rows"))
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
            if c.chunk_tokens is not None:
                entry["chunks"] = (a["chunks"] or 0) if a else 0
            entry.update(rows=embedded + quarantined, embedded=embedded, quarantined=quarantined,
                         quarantine_reasons=dict(a["reasons"]) if a else {},
                         outputs=sorted(a["outputs"]) if a else [], complete=True)
        inputs.append(entry)
    totals = None
    if accounting is not None:
        counted = ("rows", "embedded", "quarantined") + (("chunks",) if c.chunk_tokens is not None else ())
        totals = {k: sum(i[k] for i in inputs) for k in counted}
    return {
        "semvec_version": __version__,
        "status": status,
        "config_hash": p.config_hash,
        "config": {k: v for k, v in c.to_dict().items() if k not in ("overwrite",)},
        "model": {"reference": storage.display(c.model), "fingerprint": p.fingerprint,
                  "pooling": p.pooling, "normalize": p.normalize, "max_length": p.max_length,
                  "dim": p.dim, "dtype": p.precision[0] if p.precision else c.dtype.value,
                  "dtype_reason": p.precision[1] if p.precision else None},
        "ran_on": None if p.here is None else "driver" if p.here else "ray",
        "rows_per_batch": c.rows_per_batch,  # what ran, where config.batch_rows says null (the default)
        "granularity": c.granularity.value,
        "chunking": ({"chunk_tokens": c.chunk_tokens, "chunk_overlap": c.chunk_overlap,
                      "aggregate": c.aggregate.value} if c.chunk_tokens is not None else None),
        "inputs": inputs,
        "totals": totals,
        "duplicates": accounting["duplicates"] if accounting else None,
        "started_at": started,
        "finished_at": now() if status == "complete" else None,
        "timings": timings or {},
    }


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
        expected = expected_rows(p, todo)
        p.here = runs_here(config, expected)
        if p.here:
            p.precision = precision.resolved(config.dtype, "cpu")
        else:
            init_ray({**quiet_worker_env(), **crashpoints.worker_env()})
            pool = pool_for(config)  # may refuse (too few GPUs) before anything is written
            p.precision = precision.resolve_on_worker(config.dtype, pool[0], config.num_gpus_per_worker)
        log.info("precision %s (%s)", *p.precision)
    out.write_manifest(_manifest(p, "running", started))
    t_plan = time.time() - t0
    try:
        rows_this_run = (0 if not todo else execute_here(p, todo, lease, expected) if p.here
                         else execute(p, todo, pool, lease, expected))
    except Stopped as stop:
        _record_failure(out, {**_manifest(p, "failed", started), "error": str(stop)})
        raise JobFailed(str(stop)) from None
    t_run = time.time() - t0 - t_plan
    out.remove_temporaries()  # a writer on a node lost mid-job may have left its half-written file
    accounting = _account(p, out)
    _check_lease(lease, config.output)  # the last moment before the manifest says "complete"
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


def _record_failure(out: OutputDir, manifest: dict) -> None:
    """The "failed" manifest, if the store takes it (it may be the store that failed)."""
    try:
        out.write_manifest(manifest)
    except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("the manifest could not be marked failed (%s)", type(exc).__name__)


def _account(p: Plan, out: OutputDir) -> dict:
    """The accounting from the committed parts, checked (see OutputDir.account)."""
    c = p.config
    parser = RowParser(c.text_field, c.id_field, c.max_chars, c.title_field)
    return out.account(p.files, lambda f: has_rows(f, detect_format(f.relative, c.input_format), parser))


def _check_lease(lease: Lease, output: str) -> None:
    if not lease.holds():
        raise lease_lost(output)


def _failure(accounting: dict, max_share: float) -> str | None:
    """Why the output is a failure (too many rows the model could not embed), or None."""
    failed = sum(a["reasons"].get(k, 0) for a in accounting["inputs"].values() for k in FAILURE_REASONS)
    tried = failed + sum(a["embedded"] for a in accounting["inputs"].values())
    return too_many_failed(failed, tried, max_share)


def print_summary(summary: dict, stream=None) -> None:
    """The summary line, on `stream` (default: sys.stdout as it is now, a redirect or capture included)."""
    print(
        f"semvec embed: {summary['rows']} rows in -> {summary['embedded']} embedded, "
        f"{summary['quarantined']} quarantined ({summary['duplicate_ids']} duplicate ids"
        + (f", {summary['chunks']} chunks" if "chunks" in summary else "") + "); "
        + (f"{summary['rows_this_run']} rows this run in {summary['seconds']} s "
           f"({summary['rows_per_s']} rows/s)" if summary["rows_this_run"]
           else "nothing left to embed: every row was in the output already")
        + f"; output {summary['output']}",
        file=stream,
    )
