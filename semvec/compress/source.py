"""The vectors to compress: a complete backfill output, its parts and their row counts, and the
seeded sample the codec is fitted on.

The backfill's manifest and part listing come from its own module (semvec.backfill.manifest);
here only the `id` and `embedding` columns of its parts are read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from semvec import storage
from semvec.backfill.manifest import OutputDir
from semvec.errors import ConfigError


@dataclass(frozen=True)
class SourcePart:
    path: str  # as the filesystem names it (no scheme)
    name: str  # part-<key>-<first>-<last>.parquet: the compressed part takes the same name
    rows: int  # from the parquet footer


@dataclass(frozen=True)
class Source:
    uri: str
    manifest: dict
    parts: list[SourcePart]
    dim: int

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def named_before_versions(self, stored_hash: str | None, hash_of) -> bool:
        """Whether an output's stored hash is `hash_of` this source's identity as an earlier semvec
        named it (without the inputs' versions): the same vectors, made before they counted."""
        return stored_hash == hash_of(self.identity(inputs=False))

    def identity(self, inputs: bool = True) -> str:
        """What an index or compressed output was made from: the backfill's config hash, its parts,
        and the version (ETag or mtime) and size of each input it embedded.

        Parts are named by input and row range, so a changed input file re-embedded in place (the
        backfill replaces its stale parts) or an --overwrite of edited text keeps the names and
        row counts: only the inputs' versions tell those vectors from the old ones. A source
        re-embedded with other settings or other inputs has another identity.
        """
        named = [self.manifest.get("config_hash"), [(p.name, p.rows) for p in self.parts]]
        if inputs:
            named.append(sorted((i.get("source"), i.get("size"), i.get("version"))
                                for i in self.manifest.get("inputs") or []))
        blob = json.dumps(named)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def lineage(self) -> dict:
        """The source as a compressed output records it."""
        model = self.manifest.get("model") or {}
        return {"uri": storage.display(self.uri), "config_hash": self.manifest.get("config_hash"),
                "identity": self.identity(), "finished_at": self.manifest.get("finished_at"),
                "model": {k: model.get(k) for k in ("reference", "fingerprint", "pooling", "normalize",
                                                     "dim")},
                "totals": self.manifest.get("totals"), "parts": len(self.parts)}


def open_source(uri: str, verb: str = "compress") -> Source:
    """The complete backfill output at uri, or a one-line ConfigError saying why it is not one
    (`verb`: what the caller does with it, for the message)."""
    where = storage.display(uri)
    out = OutputDir(uri)
    manifest = out.read_manifest()
    if manifest is None:
        raise ConfigError(f"vectors {where!r} hold no _manifest.json: not a backfill output")
    if "compression" in manifest:
        raise ConfigError(f"vectors {where!r} are compressed already; {verb} the float vectors "
                          f"they came from ({manifest.get('source', {}).get('uri')!r})")
    chunking = manifest.get("chunking") or {}
    if chunking and chunking.get("aggregate") == "none":
        # a compressed search keeps one vector an id; scoring a document by its best chunk is the
        # float search's (semvec evaluate retrieval over the chunk rows)
        raise ConfigError(f"vectors {where!r} hold one row per chunk; {verb} a backfill with one "
                          "row per document (--aggregate mean, or no --chunk-tokens)")
    if manifest.get("status") != "complete":
        raise ConfigError(f"the backfill at {where!r} is not complete (status "
                          f"{manifest.get('status')!r}); {verb} it once it has finished")
    paths = out.list_parts()
    if not paths:
        raise ConfigError(f"vectors {where!r} hold no embedding parts")
    parts = []
    for path in paths:
        with out.fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        parts.append(SourcePart(path, path.rsplit("/", 1)[-1], meta.num_rows))
    dim = (manifest.get("model") or {}).get("dim")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"the manifest of {where!r} names no vector dim")
    return Source(uri, manifest, parts, dim)


def read_part(uri: str, path: str) -> tuple[list[str], np.ndarray]:
    """(ids, vectors [n, dim] float32) of one source part."""
    fs = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["id", "embedding"])
    dim = table.schema.field("embedding").type.list_size
    vectors = table["embedding"].combine_chunks().values.to_numpy().reshape(-1, dim)
    return table["id"].to_pylist(), vectors


def read_rows(uri: str, path: str, rows: np.ndarray) -> np.ndarray:
    """The vectors at the given row numbers of one source part: [len(rows), dim] float32."""
    return read_part(uri, path)[1][rows]


def sample_plan(rows: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Row numbers to sample in each part: `size` rows (all, if fewer) drawn uniformly without
    replacement over all parts together, by numpy's default_rng(seed).

    It depends only on the parts' row counts in name order and the seed, never on which worker
    reads what, so two runs fit the same codec. Memory is O(size), not O(rows).
    """
    total = sum(rows)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    starts = np.cumsum([0, *rows])
    cuts = np.searchsorted(chosen, starts)  # chosen[cuts[i]:cuts[i + 1]] fall in part i
    return [chosen[cuts[i]:cuts[i + 1]] - starts[i] for i in range(len(rows))]
