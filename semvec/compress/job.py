"""The compression job: plan on the driver (all checks, before Ray), then one Ray task per part
(a source under `ray_from_rows` vectors: the same steps in this process, without Ray).

    plan (checks) -> lease on the output -> what is done (committed parts) -> manifest "running"
    -> codec: the one saved under this config hash, else fitted on a seeded sample (read by
       Ray tasks) and saved -> one task per source part not done: read, encode, write it whole
    -> rows read back from the committed parts -> manifest "complete" -> lease released

Why a crash anywhere ends, after a rerun, in the output of an uninterrupted run: each source part
becomes one output part of the same name, written whole (a local rename or one S3 PUT) from the
source part and the codec alone; the codec is saved before any part and reused by every rerun
under the same config hash, and a fresh fit is the same fit (a seeded sample, a deterministic
PCA); a part once committed with the source part's row count is done, and a rerun writes only
the others. Ray re-running a task writes the same bytes under the same name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from semvec import __version__, crashpoints, storage
from semvec.backfill.manifest import now
from semvec.cluster import call_here, gather, init_ray, quiet_worker_env
from semvec.compress.codec import Codec, bytes_per_vector, fit
from semvec.compress.config import CompressConfig
from semvec.compress.output import CODEC, LEASE, CompressedDir
from semvec.compress.source import Source, SourcePart, open_source, read_part, read_rows, sample_plan
from semvec.errors import ConfigError, JobFailed, OutputMismatch, TaskFailed
from semvec.lease import Lease

log = logging.getLogger("semvec.compress")

PROGRESS_EVERY_S = 10.0


@dataclass
class Plan:
    config: CompressConfig
    source: Source
    config_hash: str
    done: set[str] = field(default_factory=set)  # output parts committed by an earlier run

    @property
    def dim(self) -> int:
        return self.config.pca or self.source.dim

    @property
    def on_ray(self) -> bool:
        return self.source.rows >= self.config.ray_from_rows


def plan(config: CompressConfig) -> Plan:
    """Check everything that can be checked before Ray starts; raise ConfigError otherwise."""
    storage.check_apart(config.vectors, config.output, "output")
    source = open_source(config.vectors)
    if config.pca is not None and config.pca > source.dim:
        raise ConfigError(f"pca {config.pca} is larger than the vectors' dim {source.dim}; "
                          f"give at most {source.dim}")
    if config.pca is not None and min(config.sample_size, source.rows) < config.pca:
        raise ConfigError(f"pca {config.pca} needs at least {config.pca} vectors to fit on; "
                          f"the source holds {source.rows}")
    p = Plan(config, source, config.output_hash(source.identity()))
    storage.check_writable(config.output)
    _check_output(p)
    return p


def _check_output(p: Plan) -> None:
    """Refuse a foreign or differently made prefix (a read only: nothing is held yet)."""
    c = p.config
    where = storage.display(c.output)
    out = CompressedDir(c.output)
    manifest = out.read_manifest()
    if manifest is not None and "compression" not in manifest:
        raise ConfigError(f"output {where!r} holds a backfill, not compressed vectors; "
                          "choose another output")
    if c.overwrite:
        return
    if manifest is None:
        if out.list_parts() or out.holds_other_files():
            raise ConfigError(f"output {where!r} is not empty and holds no semvec manifest; "
                              "choose an empty prefix or pass --overwrite")
        return
    if manifest.get("config_hash") != p.config_hash:
        if p.source.named_before_versions(manifest.get("config_hash"), c.output_hash):
            raise OutputMismatch(f"output {where!r} was compressed from these vectors by an earlier "
                                 "semvec, before an output named its inputs' versions: pass "
                                 "--overwrite once to compress them again")
        raise OutputMismatch(f"output {where!r} was compressed with other settings or from other "
                             f"vectors (hash {manifest.get('config_hash')} != {p.config_hash}); pass "
                             "--overwrite to replace it, or choose another output")


def _prepare_output(p: Plan) -> None:
    """Under the lease: clear (overwrite) or find the parts done, from the committed parts."""
    out = CompressedDir(p.config.output)
    if p.config.overwrite:
        out.clear()
        return
    _check_output(p)  # again, under the lease: a run that just ended may have changed it
    out.remove_temporaries()
    want = {s.name: s.rows for s in p.source.parts}
    p.done = {name for name, rows in out.committed().items() if want.get(name) == rows}


def run(config: CompressConfig) -> dict:
    """Plan, then compress; returns the summary."""
    t0 = time.time()
    p = plan(config)
    crashpoints.arm()
    with Lease(config.output, LEASE, what="compression", ttl_s=config.lease_ttl_s) as lease:
        _prepare_output(p)
        return _run_held(p, lease, t0)


def _run_held(p: Plan, lease: Lease, t0: float) -> dict:
    out = CompressedDir(p.config.output)
    started = now()
    codec = _saved_codec(p, out)
    if codec is None:  # parts, if any, came from a codec that is gone: a new fit rewrites them all
        p.done = set()
    todo = [s for s in p.source.parts if s.name not in p.done]
    out.write_manifest(_manifest(p, "running", started))
    if (todo or codec is None) and p.on_ray:
        init_ray({**quiet_worker_env(), **crashpoints.worker_env()})
    t_plan = time.time() - t0
    try:
        if codec is None:
            codec = _fit(p)
            out.write_codec(codec, _codec_about(p))
        t_fit = time.time() - t0 - t_plan
        rows_this_run = _compress(p, todo, codec, lease)
    except TaskFailed as exc:
        _record_failure(out, {**_manifest(p, "failed", started), "error": str(exc)})
        raise
    out.remove_temporaries()  # a writer on a node lost mid-job may have left its half-written file
    parts = _account(p, out)
    if not lease.holds():  # the last moment before the manifest says "complete"
        raise lease.lost_error()
    timings = {"plan_s": round(t_plan, 2), "fit_s": round(t_fit, 2),
               "run_s": round(time.time() - t0 - t_plan - t_fit, 2), "total_s": round(time.time() - t0, 2)}
    manifest = _manifest(p, "complete", started, codec, parts, timings)
    out.write_manifest(manifest)
    seconds = time.time() - t0
    c = manifest["compression"]
    return {"output": storage.display(p.config.output), "vectors": manifest["totals"]["rows"],
            "parts": len(parts), "parts_this_run": len(todo), "rows_this_run": rows_this_run,
            "dim_in": c["dim_in"], "dim": c["dim"], "pca": c["pca"], "quantize": c["quantize"],
            "bytes_per_vector": c["bytes_per_vector"], "explained_variance": c["explained_variance"],
            "seconds": round(seconds, 2)}


def _saved_codec(p: Plan, out: CompressedDir) -> Codec | None:
    """The codec an earlier run of this config saved (parts it wrote were encoded with it)."""
    saved = out.read_codec()
    if saved is None or saved[1].get("config_hash") != p.config_hash:
        return None
    return saved[0]


def _fit(p: Plan) -> Codec:
    """The codec fitted on the seeded sample; each part's sampled rows are read by a Ray task
    (or here, for a source under ray_from_rows)."""
    c, s = p.config, p.source
    wanted = [(part, rows) for part, rows in
              zip(s.parts, sample_plan([x.rows for x in s.parts], c.sample_size, c.seed), strict=True)
              if len(rows)]
    if p.on_ray:
        import ray

        read = ray.remote(num_cpus=1)(read_rows)
        chunks = gather([read.remote(s.uri, part.path, rows) for part, rows in wanted], "reading the sample")
    else:
        chunks = [call_here("reading the sample", read_rows, s.uri, part.path, rows) for part, rows in wanted]
    sample = np.concatenate(chunks)  # [sample rows, dim_in], in plan order
    log.info("fitting on %d sampled vectors of %d", len(sample), s.rows)
    return fit(sample, c.pca, c.quantize)


def _codec_about(p: Plan) -> dict:
    c = p.config
    return {"config_hash": p.config_hash, "source": p.source.lineage(),
            "sample": {"rows": min(c.sample_size, p.source.rows), "seed": c.seed},
            "scoring": "queries: unit q -> C q; documents: y = C (unit d - mean); score (C q) . y, "
                       "y decoded from int8 as codes * scale + offset; binary bits: y > thresholds"}


def compress_part(source_uri: str, source_path: str, output_uri: str, name: str, codec: Codec) -> int:
    """Read one source part, encode it, write it whole under the same name; its row count."""
    ids, vectors = read_part(source_uri, source_path)
    if vectors.shape[1] != codec.dim_in:
        raise ValueError(f"{name} holds vectors of dim {vectors.shape[1]}, the codec takes {codec.dim_in}")
    CompressedDir(output_uri).write_part(name, ids, codec.encode(vectors))
    return len(ids)


def _compress(p: Plan, todo: list[SourcePart], codec: Codec, lease: Lease) -> int:
    """One task per part; a line of progress every PROGRESS_EVERY_S. Rows written this run."""
    if not todo:
        return 0
    if not p.on_ray:
        return _compress_here(p, todo, codec, lease)
    import ray

    task = ray.remote(num_cpus=1)(compress_part)
    codec_ref = ray.put(codec)
    pending = {task.remote(p.source.uri, s.path, p.config.output, s.name, codec_ref): s for s in todo}
    rows, t0, last = 0, time.monotonic(), time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            rows += gather([ref], f"compressing {pending.pop(ref).name}")[0]
        if lease.lost.is_set() and not lease.holds():
            for ref in pending:
                ray.cancel(ref)
            raise lease.lost_error()
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            log.info("%d of %d parts, %d vectors (%.0f vectors/s)", len(todo) - len(pending),
                     len(todo), rows, rows / max(last - t0, 1e-9))
    return rows


def _compress_here(p: Plan, todo: list[SourcePart], codec: Codec, lease: Lease) -> int:
    """The parts one after another in this process, the lease checked before each."""
    rows = 0
    for s in todo:
        if lease.lost.is_set() and not lease.holds():
            raise lease.lost_error()
        rows += call_here(f"compressing {s.name}", compress_part, p.source.uri, s.path, p.config.output,
                          s.name, codec)
    return rows


def _account(p: Plan, out: CompressedDir) -> list[dict]:
    """Each source part's output part, with its rows read back from storage; JobFailed if one is
    missing, has other rows, or a part is there that no source part accounts for."""
    committed = out.committed()
    parts, wrong = [], []
    for s in p.source.parts:
        if committed.get(s.name) != s.rows:
            wrong.append(f"{s.name} ({committed.get(s.name)} rows, source {s.rows})")
        parts.append({"name": s.name, "rows": committed.get(s.name)})
    strays = sorted(set(committed) - {s.name for s in p.source.parts})
    if wrong or strays:
        raise JobFailed(f"the compressed output {storage.display(p.config.output)} is not consistent: "
                        + "; ".join(wrong[:3] + [f"{n} has no source part" for n in strays[:3]]))
    return parts


def _manifest(p: Plan, status: str, started: str, codec: Codec | None = None,
              parts: list[dict] | None = None, timings: dict | None = None) -> dict:
    c = p.config
    return {
        "semvec_version": __version__,
        "status": status,
        "config_hash": p.config_hash,
        "config": {k: v for k, v in c.to_dict().items() if k != "overwrite"},
        "compression": {"pca": c.pca, "quantize": c.quantize.value, "dim_in": p.source.dim,
                        "dim": p.dim, "codec": CODEC,
                        "bytes_per_vector": bytes_per_vector(p.source.dim, p.dim, c.quantize),
                        "explained_variance": codec.explained if codec else None},
        "source": p.source.lineage(),
        "ran_on": "ray" if p.on_ray else "driver",
        "parts": parts if parts is not None else [{"name": s.name, "rows": None} for s in p.source.parts],
        "totals": {"rows": sum(x["rows"] for x in parts), "parts": len(parts)} if parts else None,
        "started_at": started,
        "finished_at": now() if status == "complete" else None,
        "timings": timings or {},
    }


def _record_failure(out: CompressedDir, manifest: dict) -> None:
    """The "failed" manifest, if the store takes it (it may be the store that failed)."""
    try:
        out.write_manifest(manifest)
    except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("the manifest could not be marked failed (%s)", type(exc).__name__)


def print_summary(summary: dict, stream=None) -> None:
    """The summary line, on `stream` (default: sys.stdout as it is now, a redirect or capture included)."""
    b = summary["bytes_per_vector"]
    how = " + ".join(x for x in (f"pca {summary['pca']}" if summary["pca"] else "",
                                 summary["quantize"] if summary["quantize"] != "none" else "") if x)
    stored = f", {b['stored']} stored" if b["stored"] != b["search"] else ""
    print(f"semvec compress: {summary['vectors']} vectors in {summary['parts']} parts, dim "
          f"{summary['dim_in']} -> {how}: {b['search']} bytes a vector searched{stored} (float32 "
          f"{b['source']}); {summary['parts_this_run']} parts this run in {summary['seconds']} s; "
          f"output {summary['output']}", file=stream)
