"""Where the vectors an evaluator scores come from: a model (encoded here), a backfill output
(looked up by id; a chunked one keeps every chunk of an id), or a compressed output (searched as
stored, semvec.compress.search)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.compress.output import is_compressed
from semvec.compress.search import CompressedVectors
from semvec.errors import ConfigError

Embed = Callable[[list[str]], np.ndarray]  # texts (or ids) -> [n, dim]
Search = Callable[[np.ndarray, int], np.ndarray]  # queries [n, dim] -> [n, <= k] doc indices, best first
DocIndex = Callable[[list[str]], Search]  # doc ids -> a search over those docs, indices in that order


def model_embedder(ref: str, batch_tokens: int | None = None) -> Embed:
    """Texts -> vectors by model ref. The model loads at the first call, so the data to score are
    read (and a missing or malformed file reported) before seconds go to loading it."""
    loaded = []

    def embed(texts: list[str]) -> np.ndarray:
        if not loaded:
            from semvec.encode import Encoder
            from semvec.models import resolve_model

            loaded.append(Encoder(resolve_model(ref), batch_tokens=batch_tokens))
        return loaded[0].encode_texts(texts)

    return embed


def load_vectors(prefix: str) -> dict[str, np.ndarray]:
    """id -> vector from a backfill output prefix (the first vector wins for a repeated id).

    One row per chunk (`--chunk-tokens` without `--aggregate`) is refused: which chunk stands for
    the document would be a guess; retrieval reads them with load_chunk_vectors."""
    table = _read_parts(prefix)
    if "chunk" in table.column_names:
        raise ConfigError(f"vectors {storage.display(prefix)!r} hold one row per chunk, so a vector "
                          "per id is ambiguous: embed with --aggregate mean, or score retrieval "
                          "(documents by their best chunk)")
    matrix = _matrix(table)
    lookup: dict[str, np.ndarray] = {}
    for i, key in enumerate(table["id"].to_pylist()):
        lookup.setdefault(key, matrix[i])
    return lookup


def load_chunk_vectors(prefix: str) -> dict[str, np.ndarray]:
    """id -> every vector stored for it [n_rows, dim] (a chunked output: one per chunk)."""
    table = _read_parts(prefix)
    matrix = _matrix(table)
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(table["id"].to_pylist()):
        rows.setdefault(key, []).append(i)
    return {key: matrix[r] for key, r in rows.items()}


def is_chunked(prefix: str) -> bool:
    """Whether the output holds one row per chunk (its parts have a `chunk` column)."""
    parts = _part_paths(prefix)
    fs = storage.filesystem(prefix)
    if not parts:
        return False
    with fs.open(parts[0], "rb") as f:
        return "chunk" in pq.ParquetFile(f).schema_arrow.names


def _part_paths(prefix: str) -> list[str]:
    fs = storage.filesystem(prefix)
    root = storage.strip(prefix)
    if not fs.exists(f"{root}/_manifest.json"):
        raise ConfigError(
            f"vectors {storage.display(prefix)!r} hold no _manifest.json: not a backfill output"
        )
    if is_compressed(prefix):
        raise ConfigError(f"vectors {storage.display(prefix)!r} are compressed: only `evaluate "
                          "retrieval --vectors` reads them, with float --query-vectors")
    return [p for p in sorted(fs.ls(root, detail=False)) if storage.is_part(p)]


def _read_parts(prefix: str) -> pa.Table:
    """id, embedding (and chunk, in a chunked output) of every part."""
    fs = storage.filesystem(prefix)
    table_parts = []
    for p in _part_paths(prefix):
        with fs.open(p, "rb") as f:
            part = pq.ParquetFile(f)
            chunk = ["chunk"] if "chunk" in part.schema_arrow.names else []
            table_parts.append(part.read(columns=["id", "embedding", *chunk]))
    if not table_parts:
        raise ConfigError(f"vectors {storage.display(prefix)!r} hold no embedding parts")
    return pa.concat_tables(table_parts)


def _matrix(table: pa.Table) -> np.ndarray:
    dim = table.schema.field("embedding").type.list_size
    return table["embedding"].combine_chunks().values.to_numpy().reshape(-1, dim)


def vector_embedder(prefix: str, hint: str = "") -> Embed:
    """ids -> their stored vectors, every id present (else a ConfigError, `hint` appended)."""
    lookup = load_vectors(prefix)

    def embed(keys: list[str]) -> np.ndarray:
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ConfigError(
                f"{len(missing)} ids are not in the vectors at {storage.display(prefix)!r}, "
                f"e.g. {missing[0][:80]!r}{hint}"
            )
        return np.stack([lookup[k] for k in keys])

    return embed


def chunk_embedder(prefix: str) -> Callable[[list[str]], list[np.ndarray]]:
    """ids -> each id's stored vectors [n_chunks, dim] (a chunked output), every id present."""
    lookup = load_chunk_vectors(prefix)

    def chunks(keys: list[str]) -> list[np.ndarray]:
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ConfigError(
                f"{len(missing)} ids are not in the vectors at {storage.display(prefix)!r}, "
                f"e.g. {missing[0][:80]!r}"
            )
        return [lookup[k] for k in keys]

    return chunks


def compressed_index(prefix: str) -> DocIndex:
    """A compressed output as a DocIndex: float queries are mapped by its saved projection."""
    stored = CompressedVectors.load(prefix)
    return lambda keys: stored.take(keys).search


def built_index(uri: str) -> tuple[DocIndex, object]:
    """A built index (`semvec index`) as a DocIndex, and the opened index (its model embeds the
    queries). A ranked id that is not among the judged corpus's ids is passed over."""
    from semvec.search import open_index

    opened = open_index(uri)

    def docs(keys: list[str]) -> Search:
        position = {key: i for i, key in enumerate(keys)}
        indexed = set(opened.ids)
        missing = [key for key in keys if key not in indexed]
        if missing:
            raise ConfigError(f"{len(missing)} corpus ids are not in the index at "
                              f"{storage.display(uri)!r}, e.g. {missing[0][:80]!r} (embed the corpus "
                              "with --id-field _id before indexing it)")
        extra = len(opened.ids) - len(keys)  # vectors of ids outside the corpus (or repeated ids)

        def search(q: np.ndarray, k: int) -> np.ndarray:
            top = np.full((len(q), k), NOT_A_DOC, dtype=np.int64)
            for row, hits in enumerate(opened.search_vectors(q, min(k + extra, len(opened.ids)))):
                found = list(dict.fromkeys(position[i] for i in hits.ids if i in position))[:k]
                top[row, :len(found)] = found
            return top
        return search
    return docs, opened


NOT_A_DOC = np.iinfo(np.int64).min  # pads a ranking shorter than k: matches no document


