"""An index prefix: the one module that reads and writes it.

Under the prefix:
    index.faiss    the FAISS index (faiss.serialize_index); a vector's label is its row in ids.parquet
    ids.parquet    `id` of every vector, in label order
    _index.json    written last, so an index is complete exactly when it is there: kind, settings
                   and their hash, dim, rows, the model (reference, fingerprint, pooling, normalize,
                   max length) and the source's lineage, each file's size and sha256, timings
    _lease.json    one builder at a time (semvec.lease)

Each object is written whole (storage.write_atomic). A build that dies before _index.json leaves
an index that no reader opens; the next build writes every file again. A reader checks both
files against the sizes and hashes in _index.json, so a file replaced under a record is refused.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import crashpoints, storage
from semvec.errors import ConfigError

RECORD = "_index.json"
INDEX = "index.faiss"
IDS = "ids.parquet"
LEASE = "_lease.json"
OURS = (RECORD, INDEX, IDS, LEASE)


class IndexDir(storage.Prefix):
    """One index prefix on local disk or s3://."""

    def read_record(self) -> dict | None:
        return self.read_json(RECORD)

    def holds_other_files(self) -> bool:
        if not self.fs.exists(self.root):
            return False
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return any(n not in OURS and storage.TEMP_MARK not in n and not n.startswith(storage.PROBE_MARK)
                   for n in names)

    def clear(self) -> None:
        """Remove the index files (not the lease): a record first, so no reader opens a mix."""
        for name in (RECORD, INDEX, IDS):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
                crashpoints.wrote(f"index: removed {name}")

    def write(self, index_bytes: bytes, ids: list[str], record: dict,
              still_ours: Callable[[], None] = lambda: None) -> None:
        """The two files, then the record naming their sizes and hashes (three durable writes).
        `still_ours` raises when the prefix went to another build (a lost lease) before the record."""
        ids_bytes = _ids_parquet(ids)
        storage.write_atomic(self.fs, self.path(INDEX), index_bytes)
        storage.write_atomic(self.fs, self.path(IDS), ids_bytes)
        still_ours()
        files = {INDEX: _described(index_bytes), IDS: _described(ids_bytes)}
        self.write_json(RECORD, {**record, "files": files})

    def write_record(self, record: dict) -> None:
        """The record again (same files, other search defaults)."""
        self.write_json(RECORD, record)

    def files_match(self, record: dict) -> bool:
        """Whether both files are there with the sizes the record names (a cheap check; opening
        the index checks the hashes too)."""
        for name in (INDEX, IDS):
            want = (record.get("files") or {}).get(name) or {}
            path = self.path(name)
            if not self.fs.exists(path) or self.fs.info(path).get("size") != want.get("bytes"):
                return False
        return True

    def read(self) -> tuple[dict, bytes, list[str]]:
        """(record, index bytes, ids) of a complete index, each file checked against the record."""
        where = storage.display(self.uri)
        record = self.read_record()
        if record is None:
            raise ConfigError(f"no index at {where!r} (no {RECORD}): build one with `semvec index`")
        blobs = {}
        for name in (INDEX, IDS):
            if not self.fs.exists(self.path(name)):
                raise ConfigError(f"the index at {where!r} lacks {name}: rebuild it with `semvec index "
                                  "... --overwrite`")
            with self.fs.open(self.path(name), "rb") as f:
                blobs[name] = f.read()
            if _described(blobs[name]) != record.get("files", {}).get(name):
                raise ConfigError(f"{name} at {where!r} is not the file its {RECORD} describes "
                                  "(changed or cut since the build): rebuild it with `semvec index "
                                  "... --overwrite`")
        ids = pq.read_table(io.BytesIO(blobs[IDS]), columns=["id"])["id"].to_pylist()
        return record, blobs[INDEX], ids


def faiss_module():
    """FAISS, or a one-line error naming the install command."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("semvec index and search need FAISS: pip install faiss-cpu "
                          "(or a faiss-gpu build)") from None
    return faiss


def _ids_parquet(ids: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), sink)
    return sink.getvalue()


def _described(blob: bytes) -> dict:
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def as_bytes(array: np.ndarray) -> bytes:
    """faiss.serialize_index gives a uint8 array; the store writes bytes."""
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()
