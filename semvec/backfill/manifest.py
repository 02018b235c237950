"""The output prefix's bookkeeping: _manifest.json, finished rows, and the final accounting.

Counts in the manifest are read back from the committed parts, never summed from memory, so a
run that was killed and resumed reports exactly what is on storage.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semvec import storage
from semvec.backfill.stages import QUARANTINE_DIR, source_key
from semvec.storage import InputFile

MANIFEST = "_manifest.json"
DUPLICATE_EXAMPLES = 20


class OutputDir:
    """One backfill output prefix on local disk or s3://."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs = storage.filesystem(uri)
        self.root = storage.strip(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_manifest(self) -> dict | None:
        path = self.path(MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_manifest(self, manifest: dict) -> None:
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        storage.write_atomic(self.fs, self.path(MANIFEST), blob)

    def list_parts(self, quarantine: bool = False) -> list[str]:
        folder = self.path(QUARANTINE_DIR) if quarantine else self.root
        if not self.fs.exists(folder):
            return []
        names = self.fs.ls(folder, detail=False)
        return sorted(p for p in names
                      if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))

    def has_foreign_files(self) -> bool:
        """Anything in the prefix that a semvec backfill did not write."""
        if not self.fs.exists(self.root):
            return False
        for p in self.fs.ls(self.root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            ours = name.startswith(("part-", "_probe-")) or name in (MANIFEST, QUARANTINE_DIR)
            if not ours:
                return True
        return False

    def clear(self) -> None:
        """Remove what a backfill wrote here (parts, quarantine, manifest); nothing else."""
        for p in self.list_parts() + self.list_parts(quarantine=True):
            self.fs.rm(p)
        if self.fs.exists(self.path(MANIFEST)):
            self.fs.rm(self.path(MANIFEST))

    def parts_of(self, relative: str) -> list[str]:
        prefix = f"part-{source_key(relative)}-"
        return [p for p in self.list_parts() + self.list_parts(quarantine=True)
                if p.rsplit("/", 1)[-1].startswith(prefix)]

    def _read_column(self, path: str, column: str) -> pa.ChunkedArray:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=[column])[column]

    def done_rows(self, relative: str) -> np.ndarray:
        """Row numbers of one input file already committed, embedded or quarantined."""
        chunks = [self._read_column(p, "row").to_numpy() for p in self.parts_of(relative)]
        return np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)

    def drop_parts_of(self, relative: str) -> None:
        for p in self.parts_of(relative):
            self.fs.rm(p)

    def account(self, files: list[InputFile]) -> dict:
        """Per input: rows embedded and quarantined (by reason) and its parts; duplicate ids."""
        by_key = {source_key(f.relative): f.relative for f in files}
        inputs: dict[str, dict] = defaultdict(lambda: {"embedded": 0, "quarantined": 0,
                                                       "reasons": Counter(), "outputs": []})
        ids: list[pa.ChunkedArray] = []
        for quarantine in (False, True):
            for p in self.list_parts(quarantine):
                name = p.rsplit("/", 1)[-1]
                source = by_key.get(name.split("-")[1])
                if source is None:
                    continue  # a part of an input that is no longer listed
                entry = inputs[source]
                with self.fs.open(p, "rb") as f:
                    column = "reason" if quarantine else "id"
                    values = pq.read_table(f, columns=[column])[column]
                if quarantine:
                    entry["quarantined"] += len(values)
                    entry["reasons"].update(r.split(":", 1)[0] for r in values.to_pylist())
                else:
                    entry["embedded"] += len(values)
                    entry["outputs"].append(name)
                    ids.append(values)
        return {"inputs": inputs, "duplicates": _duplicates(ids)}


def _duplicates(ids: list[pa.ChunkedArray]) -> dict:
    # Memory grows with the number of distinct ids (about 10M ids per GB): fine for the
    # driver of one backfill; a billion-row prefix would want a distributed group-by here.
    if not ids:
        return {"count": 0, "ids": 0, "examples": []}
    counts = pc.value_counts(pa.chunked_array([c for a in ids for c in a.chunks]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    extra = int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
    examples = repeated.field("values")[:DUPLICATE_EXAMPLES].to_pylist()
    return {"count": extra, "ids": len(repeated), "examples": examples}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
