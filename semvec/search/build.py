"""`semvec index`: a FAISS index built from a complete backfill output.

    plan (checks, before Ray) -> lease on the index prefix -> an index of this hash there already:
    done -> else vectors read (Ray tasks, one per part, for large sources) -> exact / hnsw: added
    in label order; ivf: lists trained on a seeded sample, then one shard per group of parts added
    by Ray tasks and merged in label order -> index-<sha>.faiss, ids-<sha>.parquet, _index.json ->
    files no record names removed -> lease released

Vectors are L2-normalised and scored by inner product: cosine, as `semvec evaluate` scores them.
A vector's label is its position over the source's parts in name order, so every build of the
same source labels alike. Why a crash anywhere ends, after a rerun, in the index of an
uninterrupted build: nothing counts as built until _index.json is written, last, naming the two
files' sizes and hashes; a rerun that finds no record (or one of another hash, with --overwrite)
builds again from the source alone, and an index of this hash is never rebuilt. An index there
before (--overwrite) is left to readers until the new record replaces its own (semvec.search.store).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from semvec import __version__, crashpoints, storage
from semvec.backfill.manifest import now
from semvec.cluster import gather, init_ray, quiet_worker_env
from semvec.compress.source import Source, open_source, read_part, read_rows, sample_plan
from semvec.errors import ConfigError, OutputMismatch
from semvec.lease import Lease
from semvec.metrics import unit
from semvec.search.config import IndexConfig, IndexKind
from semvec.search.store import LEASE, IndexDir, as_bytes, faiss_module

log = logging.getLogger("semvec.search")

MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid
SHARD_ROWS = 250_000  # ivf: vectors per Ray task that adds a shard


@dataclass
class Plan:
    config: IndexConfig
    source: Source
    index_hash: str
    nlist: int | None  # ivf only

    @property
    def on_ray(self) -> bool:
        return self.source.rows >= self.config.ray_from_rows


def plan(config: IndexConfig) -> Plan:
    """Check everything that can be checked before Ray starts; raise ConfigError otherwise."""
    faiss_module()
    storage.check_apart(config.vectors, config.index, "index")
    source = open_source(config.vectors, verb="index")
    if source.rows == 0:
        raise ConfigError(f"vectors {storage.display(config.vectors)!r} hold no rows to index")
    nlist = None
    if config.kind == IndexKind.IVF:
        nlist = config.nlist or default_nlist(source.rows, config.train_size)
        if nlist > min(source.rows, config.train_size):
            raise ConfigError(f"nlist {nlist} needs at least {nlist} vectors to train on; the source "
                              f"holds {source.rows} and train_size is {config.train_size}: give a "
                              "smaller --nlist")
    p = Plan(config, source, config.index_hash(source.identity()), nlist)
    storage.check_writable(config.index)
    _check_index(p)
    return p


def default_nlist(rows: int, train_size: int) -> int:
    """4 sqrt(n) lists, fewer when the training sample would give a list under 39 points."""
    return max(1, min(int(4 * math.sqrt(rows)), min(rows, train_size) // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: one in 20, at least 16 (never more than there are). On 100,000
    real vectors (1,264 lists) nprobe 16 found 0.76 of the exact top 10 and 64 found 0.91."""
    return min(nlist, max(16, -(-nlist // 20)))


def _check_index(p: Plan) -> dict | None:
    """Refuse a foreign prefix, or an index of other settings or vectors unless overwriting;
    the index's record, if there is one."""
    where = storage.display(p.config.index)
    out = IndexDir(p.config.index)
    record = out.read_record()
    if record is None:
        if out.holds_other_files() and not p.config.overwrite:
            raise ConfigError(f"index prefix {where!r} holds files that are not a semvec index; "
                              "choose an empty prefix or pass --overwrite")
        return None
    if record.get("index_hash") != p.index_hash and not p.config.overwrite:
        if p.source.named_before_versions(record.get("index_hash"), p.config.index_hash):
            raise OutputMismatch(f"index {where!r} was built from these vectors by an earlier semvec, "
                                 "before an index named its inputs' versions: pass --overwrite once "
                                 "to build it again")
        raise OutputMismatch(f"index {where!r} was built with other settings or from other vectors "
                             f"(hash {record.get('index_hash')} != {p.index_hash}); pass --overwrite "
                             "to replace it, or choose another prefix")
    return record


def build(config: IndexConfig) -> dict:
    """Plan, then build (or find built) the index; returns the summary."""
    t0 = time.time()
    p = plan(config)
    crashpoints.arm()
    with Lease(config.index, LEASE, what="index build", ttl_s=config.lease_ttl_s) as lease:
        record = _check_index(p)  # again, under the lease: a build that just ended may have changed it
        out = IndexDir(config.index)
        if record is not None and record.get("index_hash") == p.index_hash and not config.overwrite \
                and out.files_match(record):
            params = _params(p)
            if record.get("params") != params:  # only the search defaults changed
                record = {**record, "params": params}
                out.write_record(record)
            out.remove_unnamed(record)  # what a build cut short after its record left
            return _summary(record, config.index, built=False, seconds=time.time() - t0)
        # an index there (--overwrite, or files damaged) answers readers until the new record
        if p.on_ray:
            init_ray({**quiet_worker_env(), **crashpoints.worker_env()})
        index, ids, t_train = _build_index(p)

        def still_ours() -> None:  # the last moment before the record makes the index visible
            if not lease.holds():
                raise lease.lost_error()

        still_ours()
        record = _record(p, index, time.time() - t0, t_train)
        record["duplicate_ids"] = _repeated(ids, config.vectors)
        record = out.write(as_bytes(faiss_module().serialize_index(index)), ids, record, still_ours)
    return _summary(record, config.index, built=True, seconds=time.time() - t0)


def _build_index(p: Plan):
    """(FAISS index, ids in label order, seconds spent training)."""
    faiss = faiss_module()
    dim = p.source.dim
    if p.config.kind == IndexKind.IVF:
        t = time.time()
        trained = _trained_ivf(p)
        t_train = time.time() - t
        index, ids = _add_ivf_shards(p, trained)
        return index, ids, t_train
    if p.config.kind == IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(dim, p.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p.config.ef_construction
        index.hnsw.efSearch = p.config.ef_search
    else:
        index = faiss.IndexFlatIP(dim)
    ids = []
    for part_ids, vectors in _read_parts(p):
        index.add(vectors)
        ids.extend(part_ids)
    return index, ids, 0.0


def _read_parts(p: Plan):
    """(ids, unit vectors) of each part, in name order: Ray tasks for a large source."""
    s = p.source
    if not p.on_ray:
        return (read_unit(s.uri, part.path) for part in s.parts)
    import ray

    task = ray.remote(num_cpus=1)(read_unit)
    refs = [task.remote(s.uri, part.path) for part in s.parts]
    return (gather([ref], f"reading {part.name}")[0] for ref, part in zip(refs, s.parts, strict=True))


def read_unit(uri: str, path: str) -> tuple[list[str], np.ndarray]:
    """(ids, vectors scaled to unit length) of one backfill part; a zero vector stays zero."""
    ids, vectors = read_part(uri, path)
    return ids, np.ascontiguousarray(unit(vectors.astype(np.float32)))


def _trained_ivf(p: Plan):
    """An empty IVF index whose lists are trained on the seeded sample (read by Ray tasks when
    the source is large)."""
    faiss = faiss_module()
    s, c = p.source, p.config
    plans = sample_plan([x.rows for x in s.parts], c.train_size, c.seed)
    chosen = [(part, rows) for part, rows in zip(s.parts, plans, strict=True) if len(rows)]
    if p.on_ray:
        import ray

        task = ray.remote(num_cpus=1)(read_rows)
        sample = gather([task.remote(s.uri, part.path, rows) for part, rows in chosen], "reading the sample")
    else:
        sample = [read_rows(s.uri, part.path, rows) for part, rows in chosen]
    sample = np.concatenate(sample).astype(np.float32)
    faiss.normalize_L2(sample)
    quantizer = faiss.IndexFlatIP(s.dim)
    index = faiss.IndexIVFFlat(quantizer, s.dim, p.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = c.seed
    log.info("training %d lists on %d sampled vectors of %d", p.nlist, len(sample), s.rows)
    index.train(sample)
    index.nprobe = _params(p)["nprobe"]
    return index


def _shards(p: Plan) -> list[list[int]]:
    """Consecutive groups of part numbers, about SHARD_ROWS vectors each."""
    groups, rows = [[]], 0
    for i, part in enumerate(p.source.parts):
        if groups[-1] and rows + part.rows > SHARD_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += part.rows
    return groups


def add_shard(uri: str, paths: list[str], first_label: int, trained: bytes) -> tuple[list[str], bytes]:
    """Add the vectors of these parts to a copy of the trained index, labelled from first_label."""
    faiss = faiss_module()
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    ids: list[str] = []
    for path in paths:
        part_ids, vectors = read_unit(uri, path)
        index.add_with_ids(vectors, np.arange(first_label + len(ids),
                                              first_label + len(ids) + len(part_ids), dtype=np.int64))
        ids.extend(part_ids)
    return ids, as_bytes(faiss.serialize_index(index))


def _add_ivf_shards(p: Plan, trained):
    faiss = faiss_module()
    s = p.source
    blob = as_bytes(faiss.serialize_index(trained))
    starts = np.cumsum([0, *[part.rows for part in s.parts]])
    jobs = [([s.parts[i].path for i in group], int(starts[group[0]])) for group in _shards(p)]
    if p.on_ray:
        import ray

        task = ray.remote(num_cpus=1)(add_shard)
        ref = ray.put(blob)
        shards = gather([task.remote(s.uri, paths, first, ref) for paths, first in jobs], "adding shards")
    else:
        shards = [add_shard(s.uri, paths, first, blob) for paths, first in jobs]
    index, ids = trained, []
    for shard_ids, shard in shards:  # in label order
        index.merge_from(faiss.deserialize_index(np.frombuffer(shard, dtype=np.uint8)), 0)
        ids.extend(shard_ids)
    return index, ids


def _params(p: Plan) -> dict:
    c = p.config
    if c.kind == IndexKind.IVF:
        return {"nlist": p.nlist, "nprobe": min(c.nprobe, p.nlist) if c.nprobe else default_nprobe(p.nlist),
                "train_size": min(c.train_size, p.source.rows), "seed": c.seed}
    return {"hnsw_m": c.hnsw_m, "ef_construction": c.ef_construction,
            "ef_search": c.ef_search} if c.kind == IndexKind.HNSW else {}


def _record(p: Plan, index, seconds: float, t_train: float) -> dict:
    c = p.config
    model = (p.source.manifest.get("model") or {})
    source_config = p.source.manifest.get("config") or {}
    params = _params(p)
    return {
        "semvec_version": __version__,
        "index_hash": p.index_hash,
        "kind": c.kind.value,
        "params": params,
        "metric": "cosine (unit vectors, inner product)",
        "dim": p.source.dim,
        "rows": int(index.ntotal),
        "model": {**{k: model.get(k) for k in ("reference", "fingerprint", "pooling", "normalize",
                                                "max_length", "dim", "dtype")},
                  # a model with its own code needs the same consent to embed the queries
                  "trust_remote_code": bool(source_config.get("trust_remote_code"))},
        "source": p.source.lineage(),
        "built_at": now(),
        "timings": {"train_s": round(t_train, 2), "total_s": round(seconds, 2)},
        "built_on": "ray" if p.on_ray else "driver",
    }


def _repeated(ids: list[str], vectors: str) -> int:
    """How many ids are there more than once (a search then answers such an id once for each of
    its vectors); said in a warning, as the backfill's manifest counts them."""
    counts = Counter(ids)
    repeated = len(ids) - len(counts)
    if repeated:
        example = next(i for i, n in counts.items() if n > 1)
        log.warning("%d vectors of %s repeat an id another vector has (e.g. %r): a search can answer "
                    "such an id once for each of its vectors", repeated, storage.display(vectors),
                    example[:200])
    return repeated


def _summary(record: dict, index: str, built: bool, seconds: float) -> dict:
    return {"index": storage.display(index), "kind": record["kind"],
            "rows": record["rows"], "dim": record["dim"], "params": record["params"],
            "model": record["model"]["reference"], "duplicate_ids": record.get("duplicate_ids", 0),
            "built": built, "seconds": round(seconds, 2)}


def print_summary(summary: dict, stream=None) -> None:
    """The summary line, on `stream` (default: sys.stdout as it is now, a redirect or capture included)."""
    params = ", ".join(f"{k} {v}" for k, v in summary["params"].items())
    print(f"semvec index: {summary['kind']} index of {summary['rows']:,} vectors (dim {summary['dim']}"
          + (f"; {params}" if params else "") + f"), model {summary['model']}; "
          + ("built" if summary["built"] else "already built, nothing to do")
          + f" in {summary['seconds']} s; index {summary['index']}", file=stream)
