"""The backfill stages' chunked mode (`--chunk-tokens`): the columns each stage adds, in Arrow.

Stages keep one row per input row here too: a document carries the lists of its windows from
tokenize to the writer, which alone explodes it into one output row per chunk (or, with
`--aggregate mean`, the encoder folds them into one vector). The window maths is semvec.chunking.

    tokenize  + chunk_ids list<list<int32>>, chunk_spans list<[int32, 2]>, chunk_content list<int32>,
                doc_tokens int32 (the whole text's tokens, specials included), truncated (False)
    encode    aggregate none: + chunk_embeddings list<float32[dim]>, chunk_n_tokens list<int32>
              aggregate mean: + embedding float32[dim], n_tokens, chunks; the chunk lists dropped
    write     one row per chunk: id, chunk, start, end, embedding, n_tokens, truncated, source, row
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semvec.backfill.read import Reason
from semvec.chunking import Chunks, split, tokenize_whole, weighted_mean

SPAN = pa.list_(pa.int32(), 2)


# ---------------------------------------------------------------- tokenize


def tokenize_rows(tok, texts: list[str], chunk_tokens: int, overlap: int):
    """(Chunks of the texts that tokenize, {index in texts: quarantine reason} of the others).

    The batch at once, else text by text, so that only the texts the tokenizer refuses go to
    quarantine (as the unchunked stage does)."""
    def chunks_of(batch: list[str]) -> list[Chunks]:
        return [split(ids, special, offsets, chunk_tokens, overlap)
                for ids, special, offsets in tokenize_whole(tok, batch)]

    try:
        return chunks_of(texts), {}
    except Exception:  # noqa: BLE001 - find the rows at fault, one by one
        pass
    done, failed = [], {}
    for j, text in enumerate(texts):
        try:
            done.extend(chunks_of([text]))
        except Exception as exc:  # noqa: BLE001 - one row the tokenizer refuses is that row's only
            failed[j] = f"{Reason.TOKENIZE_FAILED.value}: {type(exc).__name__}: {exc}"[:500]
    return done, failed


def add_token_columns(batch: pa.Table, ok: np.ndarray, chunks: list[Chunks]) -> pa.Table:
    """The tokenize stage's columns; rows not in ok (quarantined) get nulls."""
    n = batch.num_rows
    ids: list = [None] * n
    spans: list = [None] * n
    content: list = [None] * n
    tokens = np.zeros(n, dtype=np.int32)
    for c, i in zip(chunks, ok, strict=True):
        ids[i] = [w.tolist() for w in c.ids]
        spans[i] = c.spans.tolist()
        content[i] = c.content.tolist()
        tokens[i] = c.tokens
    return (batch.append_column("chunk_ids", pa.array(ids, pa.list_(pa.list_(pa.int32()))))
            .append_column("chunk_spans", pa.array(spans, pa.list_(SPAN)))
            .append_column("chunk_content", pa.array(content, pa.list_(pa.int32())))
            .append_column("doc_tokens", pa.array(tokens))
            .append_column("truncated", pa.array(np.zeros(n, dtype=bool))))


# ---------------------------------------------------------------- encode


def encode(encoder, batch: pa.Table, aggregate: bool) -> pa.Table:
    """Every window of the batch's good rows in one encoder call (it packs them by its token
    budget), regrouped per row; a batch that fails is retried document by document."""
    n, dim = batch.num_rows, encoder.dim
    ok = np.flatnonzero(batch["reason"].is_null().to_numpy(zero_copy_only=False))
    windows = batch["chunk_ids"].to_pylist()
    per_doc = [[np.asarray(w, dtype=np.int32) for w in windows[i]] for i in ok]
    reasons = batch["reason"].to_pylist()
    try:
        flat = encoder.encode_ids([w for doc in per_doc for w in doc])[0]  # [all windows, dim]
        vectors = np.split(flat, np.cumsum([len(d) for d in per_doc])[:-1]) if per_doc else []
    except Exception:  # noqa: BLE001 - a document that breaks the model goes to quarantine
        vectors = []
        for j, doc in enumerate(per_doc):
            try:
                vectors.append(encoder.encode_ids(doc)[0])
            except Exception as exc:  # noqa: BLE001
                reasons[ok[j]] = f"{Reason.ENCODE_FAILED.value}: {type(exc).__name__}: {exc}"[:500]
                vectors.append(np.zeros((len(doc), dim), dtype=np.float32))
    batch = batch.set_column(batch.column_names.index("reason"), "reason", pa.array(reasons, pa.string()))
    if aggregate:
        return _aggregated(batch, ok, per_doc, vectors, encoder.normalize, dim)
    per_row: list = [None] * n
    lengths: list = [None] * n
    for j, i in enumerate(ok):
        per_row[i] = list(vectors[j])
        lengths[i] = [len(w) for w in per_doc[j]]
    return (batch.drop_columns(["chunk_ids", "chunk_content"])
            .append_column("chunk_embeddings", pa.array(per_row, pa.list_(pa.list_(pa.float32(), dim))))
            .append_column("chunk_n_tokens", pa.array(lengths, pa.list_(pa.int32()))))


def _aggregated(batch, ok, per_doc, vectors, normalize: bool, dim: int) -> pa.Table:
    n = batch.num_rows
    content = batch["chunk_content"].to_pylist()
    full = np.zeros((n, dim), dtype=np.float32)  # quarantined rows keep zeros; never written
    counts = np.zeros(n, dtype=np.int32)
    for j, i in enumerate(ok):
        full[i] = weighted_mean(vectors[j], np.asarray(content[i]), normalize)
        counts[i] = len(per_doc[j])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()), dim)
    return (batch.drop_columns(["chunk_ids", "chunk_content", "chunk_spans"])
            .append_column("embedding", emb)
            .append_column("n_tokens", batch["doc_tokens"])
            .append_column("chunks", pa.array(counts)))


# ---------------------------------------------------------------- write


def explode(good: pa.Table) -> pa.Table:
    """One row per chunk of each (embedded) document, in document then chunk order; a document's
    id, truncated flag, source and input row repeat on each of its chunks."""
    vectors = good["chunk_embeddings"].combine_chunks()
    lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    parent = pa.array(np.repeat(np.arange(len(lengths)), lengths), pa.int64())
    chunk = np.concatenate([np.arange(k) for k in lengths]).astype(np.int32) if len(lengths) else []
    spans = good["chunk_spans"].combine_chunks().flatten().flatten().to_numpy().reshape(-1, 2)
    return pa.table({
        "id": good["id"].take(parent),
        "chunk": pa.array(chunk, pa.int32()),
        "start": pa.array(spans[:, 0], pa.int32()),
        "end": pa.array(spans[:, 1], pa.int32()),
        "embedding": vectors.flatten(),
        "n_tokens": good["chunk_n_tokens"].combine_chunks().flatten(),
        "truncated": good["truncated"].take(parent),
        "source": good["source"].take(parent),
        "row": good["row"].take(parent),
    })
