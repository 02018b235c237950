"""Ray Data stages of the backfill: read -> tokenize -> encode -> write.

Each stage declares the columns it needs and keeps one output row per input row; rows that
carry a quarantine reason pass through untouched until the writer files them.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from semvec import storage
from semvec.backfill import chunked
from semvec.backfill.read import RAW_LIMIT, ROW_SCHEMA, Reason, RowParser, detect_format, read_file_chunks
from semvec.config import EmbedConfig, Granularity
from semvec.storage import InputFile
from semvec.tokens import ModelFacts, Tokenized, tokenize

QUARANTINE_DIR = "_quarantine"
FILE_ROWS_KEY = "semvec.file_rows"  # parquet metadata of the part holding an input's last row
QUARANTINE_SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("id", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
])


def source_key(relative: str) -> str:
    """A short stable key for an input file: names its output parts."""
    return hashlib.sha1(relative.encode()).hexdigest()[:12]


def part_name(source: str, rows: pa.Table) -> str:
    """`part-<source key>-<first row>-<last row>.parquet` for the rows of one source file."""
    first = int(pa.compute.min(rows["row"]).as_py())
    last = int(pa.compute.max(rows["row"]).as_py())
    return f"part-{source_key(source)}-{first:012d}-{last:012d}.parquet"


def _require(batch: pa.Table, columns: tuple[str, ...], stage: str) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; got {batch.column_names}")


# ---------------------------------------------------------------- read


class CorpusSource(Datasource):
    """One read task per input file; each streams its file in chunks of ROW_SCHEMA rows."""

    def __init__(self, files: list[InputFile], config: EmbedConfig, done: dict[str, np.ndarray],
                 chunk_rows: int = 4096):
        self.files = files
        self.config = config
        self.done = done
        self.chunk_rows = chunk_rows

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size for f in self.files)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=file.size, exec_stats=None,
                                             input_files=[file.uri]), schema=ROW_SCHEMA)
                for file, read in zip(self.files, self.readers(), strict=True)]

    def readers(self) -> list:
        """Per file, a call that yields its rows still to do, in tables of chunk_rows."""
        c = self.config
        parser = RowParser(c.text_field, c.id_field, c.max_chars, c.title_field)
        return [functools.partial(read_file_chunks, f, detect_format(f.relative, c.input_format), parser,
                                  self.done.get(f.relative, np.empty(0, np.int64)), self.chunk_rows)
                for f in self.files]


# ---------------------------------------------------------------- tokenize


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool, facts: ModelFacts):
    # Cached per worker process: Ray reuses workers across tasks, so this loads once; without
    # transformers or torch when the plan could serialize the tokenizer (semvec.tokens).
    return facts.tokenizer(Path(model_dir), trust_remote_code)


class Tokenize:
    """Adds input_ids (and tokens/offsets in token mode; the windows of each text when chunking,
    see backfill.chunked); runs as light CPU tasks."""

    def __init__(self, model_dir: str, facts: ModelFacts, max_length: int, granularity: str,
                 trust_remote_code: bool, chunking: tuple[int, int] | None = None):
        self.model_dir = model_dir
        self.facts = facts
        self.max_length = max_length
        self.token_mode = Granularity(granularity) == Granularity.TOKEN
        self.trust_remote_code = trust_remote_code
        self.chunking = chunking  # (chunk_tokens, chunk_overlap), or None: truncate to max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require(batch, ("text", "reason"), "tokenize")
        tok = _tokenizer(self.model_dir, self.trust_remote_code, self.facts)
        ok = np.flatnonzero(batch["reason"].is_null().to_numpy(zero_copy_only=False))
        texts = batch["text"].take(pa.array(ok, pa.int64())).to_pylist()
        if self.chunking:
            tk, failed = chunked.tokenize_rows(tok, texts, *self.chunking)
        else:
            tk, failed = _tokenize_rows(tok, texts, self.max_length, self.token_mode)
        if failed:  # those rows go to quarantine with the tokenizer's error and their text; the rest go on
            columns = {name: batch[name].to_pylist() for name in ("reason", "raw")
                       if name in batch.column_names}  # raw: not in a batch a test builds by hand
            for j, reason in failed.items():
                columns["reason"][ok[j]] = reason
                if "raw" in columns:
                    columns["raw"][ok[j]] = texts[j][:RAW_LIMIT]
            for name, values in columns.items():
                batch = batch.set_column(batch.column_names.index(name), name, pa.array(values, pa.string()))
            ok = np.delete(ok, list(failed))
        if self.chunking:
            return chunked.add_token_columns(batch.drop_columns(["text"]), ok, tk)
        n = batch.num_rows
        ids: list = [None] * n
        truncated = np.zeros(n, dtype=bool)
        truncated[ok] = tk.truncated
        for j, i in enumerate(ok):
            ids[i] = tk.ids[j]
        batch = batch.drop_columns(["text"])
        batch = batch.append_column("input_ids", pa.array(ids, pa.list_(pa.int32())))
        batch = batch.append_column("truncated", pa.array(truncated))
        if self.token_mode:
            keep: list = [None] * n
            offsets: list = [None] * n
            tokens: list = [None] * n
            for j, i in enumerate(ok):
                real = ~tk.special[j]  # special tokens ([CLS], [SEP]) carry no text
                keep[i] = real
                offsets[i] = tk.offsets[j][real]
                tokens[i] = tok.convert_ids_to_tokens(tk.ids[j][real].tolist())
            batch = batch.append_column("keep", pa.array(keep, pa.list_(pa.bool_())))
            batch = batch.append_column("offsets", _offsets_array(offsets))
            batch = batch.append_column("tokens", pa.array(tokens, pa.list_(pa.string())))
        return batch


def _tokenize_rows(tok, texts: list[str], max_length: int, with_offsets: bool):
    """(Tokenized of the rows that tokenize, {index in texts: quarantine reason} of the others).

    The batch at once; if the tokenizer raises, row by row, so that only the rows it fails on
    go to quarantine (a custom tokenizer can refuse a text) and the job goes on.
    """
    try:
        return tokenize(tok, texts, max_length, with_offsets=with_offsets), {}
    except Exception:  # noqa: BLE001 - find the rows at fault, one by one
        pass
    done: list[Tokenized] = []
    failed: dict[int, str] = {}
    for j, text in enumerate(texts):
        try:
            done.append(tokenize(tok, [text], max_length, with_offsets=with_offsets))
        except Exception as exc:  # noqa: BLE001 - one row the tokenizer refuses is that row's only
            failed[j] = f"{Reason.TOKENIZE_FAILED.value}: {type(exc).__name__}: {exc}"[:500]
    merged = Tokenized(ids=[t.ids[0] for t in done],
                       truncated=np.array([t.truncated[0] for t in done], dtype=bool))
    if with_offsets:
        merged.special = [t.special[0] for t in done]
        merged.offsets = [t.offsets[0] for t in done]
    return merged, failed


def _offsets_array(offsets: list) -> pa.Array:
    pairs = pa.list_(pa.int32(), 2)
    return pa.array([None if o is None else o.tolist() for o in offsets], pa.list_(pairs))


# ---------------------------------------------------------------- encode


class EncodeActor:
    """One per pool slot: loads the model once, then embeds batch after batch."""

    def __init__(self, model_dir: str, config: dict, threads: int | None):
        import torch

        from semvec.encode import Encoder

        if threads:  # None: torch's own choice (a job run in the driver's process)
            torch.set_num_threads(threads)
        self.token_mode = config["granularity"] == Granularity.TOKEN.value
        self.chunked = bool(config.get("chunked"))
        self.aggregate = config.get("aggregate") == "mean"
        self.encoder = Encoder(
            Path(model_dir),
            pooling=config["pooling"],
            normalize=config["normalize"],
            max_length=config["max_length"],
            dtype=config["dtype"],
            device=config.get("device"),  # None: a GPU if this actor was given one
            batch_tokens=config["batch_tokens"],
            trust_remote_code=config["trust_remote_code"],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.chunked:
            _require(batch, ("chunk_ids", "chunk_content", "doc_tokens", "reason"), "encode")
            return chunked.encode(self.encoder, batch, self.aggregate)
        _require(batch, ("input_ids", "reason"), "encode")
        n = batch.num_rows
        ok = np.flatnonzero(batch["reason"].is_null().to_numpy(zero_copy_only=False))
        ids_col = batch["input_ids"].combine_chunks()
        flat = ids_col.values.to_numpy()
        offsets = ids_col.offsets.to_numpy()
        ids = [flat[offsets[i]:offsets[i + 1]] for i in ok]
        reasons = batch["reason"].to_pylist()
        dim = self.encoder.dim
        try:
            vectors, token_vectors = self.encoder.encode_ids(ids, with_tokens=self.token_mode)
        except Exception as exc:  # noqa: BLE001 - a row that breaks the model goes to quarantine
            vectors, token_vectors = self._one_by_one(ids, ok, reasons, exc)
        full = np.zeros((n, dim), dtype=np.float32)
        full[ok] = vectors
        # Quarantined rows keep a zero vector here; the writer files them apart, never as output.
        emb = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()), dim)
        n_tokens = np.zeros(n, dtype=np.int32)
        n_tokens[ok] = [len(x) for x in ids]
        batch = batch.drop_columns(["input_ids"])
        batch = batch.set_column(batch.column_names.index("reason"), "reason", pa.array(reasons, pa.string()))
        batch = batch.append_column("embedding", emb)
        batch = batch.append_column("n_tokens", pa.array(n_tokens))
        if self.token_mode:
            batch = self._add_token_vectors(batch, ok, token_vectors, dim)
        return batch

    def _one_by_one(self, ids, ok, reasons, first_exc):
        """A batch failed: retry row by row so only the rows that really fail are quarantined."""
        dim = self.encoder.dim
        vectors = np.zeros((len(ids), dim), dtype=np.float32)
        tokens: list = [None] * len(ids)
        for j, row_ids in enumerate(ids):
            try:
                v, t = self.encoder.encode_ids([row_ids], with_tokens=self.token_mode)
                vectors[j] = v[0]
                if t is not None:
                    tokens[j] = t[0]
            except Exception as exc:  # noqa: BLE001
                reasons[ok[j]] = f"{Reason.ENCODE_FAILED.value}: {type(exc).__name__}: {exc}"[:500]
        return vectors, tokens if self.token_mode else None

    @staticmethod
    def _add_token_vectors(batch: pa.Table, ok, token_vectors, dim: int) -> pa.Table:
        keep = batch["keep"].to_pylist()
        per_row: list = [None] * batch.num_rows
        for j, i in enumerate(ok):
            if token_vectors[j] is not None and keep[i] is not None:
                per_row[i] = token_vectors[j][np.asarray(keep[i], dtype=bool)]
        vec_type = pa.list_(pa.float32(), dim)
        arr = pa.array([None if v is None else list(v) for v in per_row], pa.list_(vec_type))
        return batch.drop_columns(["keep"]).append_column("token_embeddings", arr)


# ---------------------------------------------------------------- write


@dataclass(frozen=True)
class Writer:
    """Commits each batch: per source file it holds, a quarantine part, then an output part.

    The commit protocol, and why a crash anywhere cannot lose or double a row:
    - A part holds rows of one source file and is named by the first and last row it holds:
      `part-<source key>-<first>-<last>.parquet`, in the prefix or in `_quarantine/`.
    - Each part appears whole or not at all (a local rename, one S3 PUT); nothing else is
      written per batch, and a part, once there, is never replaced by other rows.
    - What is done is read from the parts alone: a rerun re-reads every row that no committed
      part holds (`OutputDir.done_rows`) and leaves every other row alone.
    - The part that holds an input's last row carries the input's row count, as the reader
      counted it (`file_rows` in its parquet metadata), so what an input should hold is known
      from the parts too.
    A chunked output (`--chunk-tokens` without `--aggregate`) holds a document's row once per
    chunk, all in the same part; what is done and what is accounted count the rows whose `chunk`
    is 0, once per document.
    So every row is in at most one part: a new part only holds rows that no committed part holds,
    and for the same reason its name is new (a committed part of that name would hold its first
    row). A crash between a batch's quarantine part and its output part leaves the good rows
    undone, and the rerun embeds them. Ray re-running a task after a lost worker writes the same
    rows under the same name, with the same bytes. `OutputDir.account` checks at the end that every
    input's rows 0 .. file_rows - 1 are each in exactly one part (none twice, none missing, at the
    end of a file too) and that an input with no part has no row; the job fails otherwise. A rerun
    reads again an input that finished once but whose parts no longer hold all its rows.
    """

    output: str
    token_mode: bool
    chunks: bool = False  # one output row per chunk (chunk_embeddings, from backfill.chunked)
    aggregated: bool = False  # one row per document with its chunk count

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = "chunk_embeddings" if self.chunks else "embedding"
        _require(batch, ("source", "row", "id", "reason", vectors, "file_rows"), "write")
        fs = storage.filesystem(self.output)
        root = storage.strip(self.output)
        stats = []
        for source in sorted(set(batch["source"].to_pylist())):
            part = batch.filter(pa.compute.equal(batch["source"], source))
            bad_mask = part["reason"].is_valid()
            good = part.filter(pa.compute.invert(bad_mask))
            bad = part.filter(bad_mask)
            if bad.num_rows:  # first: the output part is what makes the good rows done
                rows = bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
                _put(fs, f"{root}/{QUARANTINE_DIR}/{part_name(source, bad)}", _marked(rows, bad))
            if good.num_rows:
                _put(fs, f"{root}/{part_name(source, good)}", _marked(self._embedded(good), good))
            stats.append((source, good.num_rows, bad.num_rows, _reason_counts(bad)))
        cols = list(zip(*stats, strict=True))
        return pa.table({"source": list(cols[0]), "embedded": list(cols[1]),
                         "quarantined": list(cols[2]), "reasons": list(cols[3])})

    def _embedded(self, good: pa.Table) -> pa.Table:
        if self.chunks:
            return chunked.explode(good)
        columns = ["id", "embedding", "n_tokens", "truncated", "source", "row"]
        if self.aggregated:
            columns.insert(3, "chunks")
        if self.token_mode:
            columns += ["tokens", "offsets", "token_embeddings"]
        return good.select(columns)


def _marked(rows: pa.Table, batch: pa.Table) -> pa.Table:
    """The part's rows, with the file's row count in its metadata if it holds the file's last row."""
    marks = batch["file_rows"].drop_null()
    if not len(marks):
        return rows
    return rows.replace_schema_metadata({FILE_ROWS_KEY: str(marks[0].as_py())})


def file_rows_of(metadata: dict | None) -> int | None:
    """The file's row count a part's parquet metadata holds, if it holds the file's last row."""
    value = (metadata or {}).get(FILE_ROWS_KEY.encode())
    return None if value is None else int(value)


def _reason_counts(bad: pa.Table) -> str:
    if not bad.num_rows:
        return "{}"
    import json

    names = [r.split(":", 1)[0] for r in bad["reason"].to_pylist()]
    return json.dumps({k: names.count(k) for k in sorted(set(names))})


def _put(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_atomic(fs, path, buf.getvalue())
