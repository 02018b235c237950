"""The index build's one typed config, validated on the driver before anything is read.

What needs the source (is it a complete backfill, are there enough vectors for --nlist) is
checked by `semvec.search.build.plan`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from semvec.config import load_settings, parse_enum, plain, require_int, require_lease_ttl
from semvec.errors import ConfigError

INDEX_VERSION = 1  # bumped when the index layout changes: an older index is then refused


class IndexKind(str, Enum):
    EXACT = "exact"  # every vector scored (FAISS IndexFlatIP): the reference, recall 1
    HNSW = "hnsw"  # a graph (FAISS IndexHNSWFlat): fast queries, slower build, no training
    IVF = "ivf"  # inverted lists (FAISS IndexIVFFlat): k-means on a sample, shards added in parallel


@dataclass
class IndexConfig:
    """One index build from a backfill output. Fields marked 'index-shaping' enter the config hash."""

    vectors: str
    index: str
    kind: IndexKind = IndexKind.EXACT  # index-shaping
    hnsw_m: int = 32  # index-shaping (hnsw)
    ef_construction: int = 200  # index-shaping (hnsw)
    ef_search: int = 128
    nlist: int | None = None  # index-shaping (ivf)
    nprobe: int | None = None  # default: build.default_nprobe(nlist)
    train_size: int = 100_000  # index-shaping (ivf)
    seed: int = 0  # index-shaping (ivf)
    ray_from_rows: int = 200_000
    overwrite: bool = False
    lease_ttl_s: float = 120.0

    HELP: ClassVar[dict[str, str]] = {
        "vectors": "a complete backfill output prefix (local or s3://) with one row per document",
        "index": "index prefix, local or s3://: the index file, its ids and _index.json",
        "kind": "exact scores every vector (recall 1); hnsw is a graph; ivf clusters the vectors "
                "(k-means on a seeded sample) and searches the nearest lists",
        "hnsw_m": "hnsw: neighbours per node (more: better recall, more memory)",
        "ef_construction": "hnsw: candidates kept while the graph is built",
        "ef_search": "hnsw: candidates kept per query, the default of every search (more: better "
                     "recall, slower)",
        "nlist": "ivf: number of lists (default: 4 x sqrt(vectors), at most vectors / 39)",
        "nprobe": "ivf: lists searched per query, the default of every search (default: one list in "
                  "20, at least 16: recall@10 about 0.9 on real vectors, see benchmarks/RESULTS.md)",
        "train_size": "ivf: vectors sampled (seeded, uniform over all parts) to train the lists on",
        "seed": "seed of the ivf sample and k-means",
        "ray_from_rows": "sources with at least this many vectors are read (and ivf shards added) "
                         "by Ray tasks; smaller ones in this process",
        "overwrite": "replace an index built with other settings or from other vectors (else refused)",
        "lease_ttl_s": "seconds after which an s3:// index's unrenewed lease counts as stale",
    }

    # What shapes each kind of index (search defaults such as ef_search and nprobe do not: a
    # build with other defaults rewrites the record only).
    HASHED = {IndexKind.EXACT: (), IndexKind.HNSW: ("hnsw_m", "ef_construction"),
              IndexKind.IVF: ("nlist", "train_size", "seed")}
    # The settings only one kind reads.
    TUNES = {IndexKind.HNSW: ("hnsw_m", "ef_construction", "ef_search"),
             IndexKind.IVF: ("nlist", "nprobe", "train_size", "seed")}

    def __post_init__(self) -> None:
        self.kind = parse_enum(IndexKind, "kind", self.kind)
        for name in ("vectors", "index"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name, least in (("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1),
                            ("train_size", 1), ("seed", 0), ("ray_from_rows", 1)):
            require_int(name, getattr(self, name), least)
        for name in ("nlist", "nprobe"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), 1)
        require_lease_ttl(self.lease_ttl_s)
        self._refuse_other_kinds_settings()

    def _refuse_other_kinds_settings(self) -> None:
        """A setting of another kind (--nprobe on an exact index, --hnsw-m on ivf) was ignored;
        as `semvec search` refuses it, so does the build. A setting given at its default cannot be
        told from one not given, and changes nothing."""
        defaults = {f.name: f.default for f in fields(self)}
        for kind, names in self.TUNES.items():
            if kind == self.kind:
                continue
            given = [n for n in names if getattr(self, n) != defaults[n]]
            if given:
                flag = given[0].replace("_", "-")
                raise ConfigError(f"{given[0]} (--{flag}) tunes {kind.value} indexes; this index is "
                                  f"{self.kind.value}: drop it or give --kind {kind.value}")

    def index_hash(self, source_identity: str) -> str:
        """Hash of what shapes the index, the source's identity included: a build with another
        hash into the same prefix is refused (or, with overwrite, replaces it)."""
        shaping = {name: plain(getattr(self, name)) for name in ("kind", *self.HASHED[self.kind])}
        shaping.update(source=source_identity, index_version=INDEX_VERSION)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


def load_index_config(path: str | Path | None = None, **overrides: Any) -> IndexConfig:
    """Read an index YAML config (optional) and apply overrides (None means 'not given')."""
    return load_settings(IndexConfig, path, ("vectors", "index"), overrides)
