"""The output prefix's bookkeeping: _manifest.json, finished rows, and the final accounting.

Counts in the manifest are read back from the committed parts, never summed from memory, so a
run that was killed and resumed reports exactly what is on storage. A chunked part holds each
document's row once per chunk: a document is counted by its chunk 0 row, its chunks apart.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semvec import crashpoints, storage
from semvec.backfill.read import RAW_LIMIT
from semvec.backfill.stages import QUARANTINE_DIR, file_rows_of, source_key
from semvec.storage import InputFile

MANIFEST = "_manifest.json"
LEASE = "_lease.json"
DUPLICATE_EXAMPLES = 20
ID_EXAMPLE_CHARS = RAW_LIMIT  # ids may be whole texts (--id-field text): cut like quarantine's


class AccountingError(RuntimeError):
    """The committed parts break the invariant (a row twice, or a row missing): never 'complete'."""

    exit_code = 1


class OutputDir(storage.Prefix):
    """One backfill output prefix on local disk or s3://."""

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST)

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, manifest)

    def list_parts(self, quarantine: bool = False) -> list[str]:
        folder = self.path(QUARANTINE_DIR) if quarantine else self.root
        if not self.fs.exists(folder):
            return []
        names = self.fs.ls(folder, detail=False)
        return sorted(p for p in names if storage.is_part(p))

    def has_foreign_files(self) -> bool:
        """Anything in the prefix that a semvec backfill did not write."""
        if not self.fs.exists(self.root):
            return False
        return any(not storage.written_by_us(storage.basename(p), _ours)
                   for p in self.fs.ls(self.root, detail=False))

    def clear(self) -> None:
        """Remove what a backfill wrote here (parts, quarantine, manifest); nothing else.

        The manifest goes first: a crash part-way leaves parts and no manifest, which the rerun
        (with --overwrite again) clears, and without it refuses as not semvec's."""
        if self.fs.exists(self.path(MANIFEST)):
            self.fs.rm(self.path(MANIFEST))
            crashpoints.wrote("overwrite: manifest removed")
        for p in self.list_parts() + self.list_parts(quarantine=True):
            self.fs.rm(p)
            crashpoints.wrote(f"overwrite: part removed {p}")
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """The temporaries of this output's own local writes that a crash cut short before their
        rename (storage.remove_temporaries); call only while holding the lease."""
        for folder in (self.root, self.path(QUARANTINE_DIR)):
            storage.remove_temporaries(self.fs, folder, _ours)

    def parts_by_source(self) -> dict[str, list[str]]:
        """Every committed part, quarantine's included, by source key (stages.source_key): one
        listing of the prefix serves every input file."""
        parts: dict[str, list[str]] = defaultdict(list)
        for p in self.list_parts() + self.list_parts(quarantine=True):
            parts[p.rsplit("/", 1)[-1].split("-")[1]].append(p)
        return dict(parts)

    def _read_documents(self, path: str, columns: list[str]) -> tuple[pa.Table, int | None]:
        """The part's columns, one row per document, and its chunks (None: not a chunked part).

        A part of one row per chunk keeps its chunk 0 rows; one of aggregated documents says
        how many chunks each had."""
        with self.fs.open(path, "rb") as f:
            part = pq.ParquetFile(f)
            names = part.schema_arrow.names
            if "chunk" in names:
                table = part.read(columns=[*columns, "chunk"])
                chunks = table.num_rows
                return table.filter(pc.equal(table["chunk"], 0)).select(columns), chunks
            table = part.read(columns=columns + (["chunks"] if "chunks" in names else []))
        if "chunks" in names:
            return table.select(columns), int(pc.sum(table["chunks"]).as_py() or 0)
        return table, None

    def done_rows(self, parts: list[str]) -> np.ndarray:
        """Row numbers committed in these parts (one input file's), embedded or quarantined."""
        chunks = [self._read_documents(p, ["row"])[0]["row"].to_numpy() for p in parts]
        return np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)

    def remove(self, parts: list[str]) -> None:
        """Remove parts (of an input that changed since they were written). The manifest still
        holds the input's old version until the run writes its own: cut short, a rerun removes the
        rest."""
        for p in parts:
            self.fs.rm(p)
            crashpoints.wrote(f"stale part removed {p}")

    def account(self, files: list[InputFile], has_rows: Callable[[InputFile], bool]) -> dict:
        """Per input: rows embedded and quarantined (by reason), chunks (None: not chunked) and
        its parts; duplicate ids (of documents: chunk rows share their document's id).

        Also the protocol's check: within each input, every row number from 0 to the input's row
        count (as the reader counted it; kept with the part that holds its last row) is in
        exactly one part, and an input with no part has no row (`has_rows`, asked only then,
        reads up to its first). A row twice, a gap, or rows missing at the end raise
        AccountingError.
        """
        by_key = {source_key(f.relative): f.relative for f in files}
        inputs: dict[str, dict] = defaultdict(lambda: {"embedded": 0, "quarantined": 0, "chunks": None,
                                                       "reasons": Counter(), "outputs": []})
        rows: dict[str, list[np.ndarray]] = defaultdict(list)
        ends: dict[str, int] = {}
        ids: list[pa.ChunkedArray] = []
        for quarantine in (False, True):
            for p in self.list_parts(quarantine):
                name = p.rsplit("/", 1)[-1]
                source = by_key.get(name.split("-")[1])
                if source is None:
                    continue  # a part of an input that is no longer listed
                entry = inputs[source]
                column = "reason" if quarantine else "id"
                table, chunks = self._read_documents(p, [column, "row"])
                if chunks is not None:
                    entry["chunks"] = (entry["chunks"] or 0) + chunks
                values = table[column]
                rows[source].append(table["row"].to_numpy())
                end = file_rows_of(table.schema.metadata)
                if end is not None:
                    ends[source] = end
                if quarantine:
                    entry["quarantined"] += len(values)
                    entry["reasons"].update(r.split(":", 1)[0] for r in values.to_pylist())
                else:
                    entry["embedded"] += len(values)
                    entry["outputs"].append(name)
                    ids.append(values)
        for source, chunks in rows.items():
            _check_rows(source, np.concatenate(chunks), ends.get(source))
        for f in files:
            if f.relative not in rows and has_rows(f):
                raise AccountingError(f"input {f.relative!r} has rows but none of them is in a "
                                      "committed part; the output prefix is not complete")
        return {"inputs": inputs, "duplicates": _duplicates(ids)}


def _check_rows(source: str, rows: np.ndarray, file_rows: int | None) -> None:
    """Rows 0 .. file_rows - 1 each once. No count at all: the part with the last row is gone."""
    rows = np.sort(rows)
    twice = rows[1:][rows[1:] == rows[:-1]]
    if len(twice):
        raise AccountingError(f"input {source!r}: row {int(twice[0])} is in two committed parts "
                              f"({len(twice)} such rows); the output prefix is not consistent")
    if file_rows is None:
        raise AccountingError(f"input {source!r}: no committed part holds its last row (rows after "
                              f"{int(rows[-1])} are in no part); the output prefix is not complete")
    missing = np.setdiff1d(np.arange(file_rows), rows)
    if len(missing) or rows[-1] >= file_rows:
        raise AccountingError(f"input {source!r}: {len(rows)} rows committed, {file_rows} read; "
                              f"rows {missing[:5].tolist()} (of {len(missing)}) are in no part")


def _duplicates(ids: list[pa.ChunkedArray]) -> dict:
    # Memory grows with the number of distinct ids (about 10M ids per GB): fine for the
    # driver of one backfill; a billion-row prefix would want a distributed group-by here.
    if not ids:
        return {"count": 0, "ids": 0, "examples": []}
    counts = pc.value_counts(pa.chunked_array([c for a in ids for c in a.chunks]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    extra = int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
    examples = [v[:ID_EXAMPLE_CHARS] for v in repeated.field("values")[:DUPLICATE_EXAMPLES].to_pylist()]
    return {"count": extra, "ids": len(repeated), "examples": examples}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _ours(name: str) -> bool:
    """A name a backfill writes in its prefix (or its quarantine folder)."""
    return storage.is_part(name) or name in (MANIFEST, QUARANTINE_DIR, LEASE)
