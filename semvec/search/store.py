"""An index prefix: the one module that reads and writes it.

Under the prefix:
    index-<sha>.faiss   the FAISS index (faiss.serialize_index); a vector's label is its row in the ids
    ids-<sha>.parquet   `id` of every vector, in label order
    _index.json         written last, so an index is complete exactly when it is there: kind, settings
                        and their hash, dim, rows, the model (reference, fingerprint, pooling,
                        normalize, max length) and the source's lineage, the two files' names, sizes
                        and sha256, timings
    _lease.json         one builder at a time (semvec.lease)

The two files are named by the first 16 hex digits of their content's sha256, so a build never
writes over a file another record names: a rebuild (--overwrite) writes its files beside the old
index, which answers every reader until the new record replaces the old one; only then are the
files no record names removed. Each object is written whole (storage.write_atomic). A build that
dies before _index.json leaves the old index (or none) for readers and unnamed files that the next
build removes. A reader checks both files against the sizes and hashes in the record, so a file
replaced under a record is refused; a reader that finds a file gone because a rebuild just
replaced the record reads the new record. Indexes built before the files were named by content
(index.faiss, ids.parquet) open as they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import crashpoints, storage
from semvec.errors import ConfigError, JobFailed

log = logging.getLogger("semvec.search")

RECORD = "_index.json"
INDEX = "index.faiss"  # the names before files were named by content: read, never written
IDS = "ids.parquet"
LEASE = "_lease.json"
FILE = re.compile(r"(index-[0-9a-f]{16}\.faiss|ids-[0-9a-f]{16}\.parquet)$")  # the names written now
READ_TRIES = 3  # a reader whose files went with a rebuild's new record reads that record again


class IndexDir(storage.Prefix):
    """One index prefix on local disk or s3://."""

    def read_record(self) -> dict | None:
        blob = self._fetch(RECORD)
        return None if blob is None else json.loads(blob)

    def _fetch(self, name: str) -> bytes | None:
        """A file's bytes in one request (None when it is not there). One GET, not an open and
        reads: s3fs's reads of an open file name its ETag, and fail (FileExpired) when a rebuild
        replaces the record between the two."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def _names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [storage.basename(p) for p in self.fs.ls(self.root, detail=False)]

    def holds_other_files(self) -> bool:
        return any(not storage.written_by_us(n, _ours) for n in self._names())

    def remove_unnamed(self, record: dict) -> None:
        """Remove the index files the record does not name (an index the record replaced, or the
        files of a build that died before its record), and the temporaries of local writes that a
        crash cut short. Call only while holding the lease."""
        keep = set(files_of(record).values())
        for name in self._names():
            if name not in keep and (name in (INDEX, IDS) or FILE.match(name)):
                self.fs.rm(self.path(name))
                crashpoints.wrote(f"index: removed {name}")
        storage.remove_temporaries(self.fs, self.root, _ours)

    def write(self, index_bytes: bytes, ids: list[str], record: dict,
              still_ours: Callable[[], None] = lambda: None) -> dict:
        """The two files under names of their content, then the record naming them with their sizes
        and hashes (three durable writes), then the files the record does not name are removed. An
        index there before answers readers until the record is replaced. `still_ours` raises when
        the prefix went to another build (a lost lease) before the record. Returns the record."""
        blobs = {"index": index_bytes, "ids": _ids_parquet(ids)}
        files = {}
        for role, blob in blobs.items():
            described = _described(blob)
            name = f"{role}-{described['sha256'][:16]}.{'faiss' if role == 'index' else 'parquet'}"
            storage.write_atomic(self.fs, self.path(name), blob)
            files[name] = {"role": role, **described}
        still_ours()
        record = {**record, "files": files}
        self.write_json(RECORD, record)
        try:
            still_ours()  # a build that took the prefix over may have files its record will name
        except JobFailed as exc:  # the index is built and seen; only the tidying waits
            log.warning("the index at %s is built, but its lease was lost (%s): files of the index "
                        "it replaced stay until the next build", storage.display(self.uri), exc)
            return record
        self.remove_unnamed(record)
        return record

    def write_record(self, record: dict) -> None:
        """The record again (same files, other search defaults)."""
        self.write_json(RECORD, record)

    def files_match(self, record: dict) -> bool:
        """Whether both files are there with the sizes the record names (a cheap check; opening
        the index checks the hashes too)."""
        for name in files_of(record).values():
            want = (record.get("files") or {}).get(name) or {}
            path = self.path(name)
            if not self.fs.exists(path) or self.fs.info(path).get("size") != want.get("bytes"):
                return False
        return True

    def read(self) -> tuple[dict, bytes, list[str]]:
        """(record, index bytes, ids) of a complete index, each file checked against the record."""
        where = storage.display(self.uri)
        record = self.read_record()
        for attempt in range(READ_TRIES):
            if record is None:
                raise ConfigError(f"no index at {where!r} (no {RECORD}): build one with `semvec index`")
            blobs = self._read_files(record)
            if blobs is not None:
                break
            self.fs.invalidate_cache(self.root)
            again = self.read_record()
            if again == record or attempt == READ_TRIES - 1:
                missing = next((n for n in files_of(record).values() if not self.fs.exists(self.path(n))),
                               "a file its record names")
                raise ConfigError(f"the index at {where!r} lacks {missing}: rebuild it with `semvec "
                                  "index ... --overwrite`")
            record = again  # replaced by a rebuild while this reader read: its files are the new ones
        for role, name in files_of(record).items():
            want = (record.get("files") or {}).get(name) or {}
            if _described(blobs[role]) != {k: v for k, v in want.items() if k != "role"}:
                raise ConfigError(f"{name} at {where!r} is not the file its {RECORD} describes "
                                  "(changed or cut since the build): rebuild it with `semvec index "
                                  "... --overwrite`")
        ids = pq.read_table(io.BytesIO(blobs["ids"]), columns=["id"])["id"].to_pylist()
        return record, blobs["index"], ids

    def _read_files(self, record: dict) -> dict[str, bytes] | None:
        """{role: bytes} of the files the record names; None when one is gone."""
        blobs = {}
        for role, name in files_of(record).items():
            blobs[role] = self._fetch(name)
            if blobs[role] is None:
                return None
        return blobs


def files_of(record: dict) -> dict[str, str]:
    """{"index": name, "ids": name} of the files a record names."""
    files = record.get("files") or {}
    by_role = {v.get("role"): name for name, v in files.items() if isinstance(v, dict) and v.get("role")}
    return {"index": by_role.get("index", INDEX), "ids": by_role.get("ids", IDS)}


def _ours(name: str) -> bool:
    return name in (RECORD, INDEX, IDS, LEASE) or bool(FILE.match(name))


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
