"""Where the vectors an evaluator scores come from: a model (encoded here) or a backfill output
(looked up by id)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.errors import ConfigError

Embed = Callable[[list[str]], np.ndarray]  # texts (or ids) -> [n, dim]


def model_embedder(ref: str, batch_tokens: int | None = None) -> Embed:
    from semvec.encode import Encoder
    from semvec.models import resolve_model

    encoder = Encoder(resolve_model(ref), batch_tokens=batch_tokens)
    return encoder.encode_texts


def load_vectors(prefix: str) -> dict[str, np.ndarray]:
    """id -> vector from a backfill output prefix (the first vector wins for a repeated id)."""
    fs = storage.filesystem(prefix)
    root = storage.strip(prefix)
    if not fs.exists(f"{root}/_manifest.json"):
        raise ConfigError(
            f"vectors {storage.display(prefix)!r} hold no _manifest.json: not a backfill output"
        )
    table_parts = []
    for p in sorted(fs.ls(root, detail=False)):
        if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                table_parts.append(pq.read_table(f, columns=["id", "embedding"]))
    if not table_parts:
        raise ConfigError(f"vectors {storage.display(prefix)!r} hold no embedding parts")
    table = pa.concat_tables(table_parts)
    dim = table.schema.field("embedding").type.list_size
    matrix = table["embedding"].combine_chunks().values.to_numpy().reshape(-1, dim)
    lookup: dict[str, np.ndarray] = {}
    for i, key in enumerate(table["id"].to_pylist()):
        lookup.setdefault(key, matrix[i])
    return lookup


def vector_embedder(prefix: str) -> Embed:
    lookup = load_vectors(prefix)

    def embed(keys: list[str]) -> np.ndarray:
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ConfigError(
                f"{len(missing)} ids are not in the vectors at {storage.display(prefix)!r}, "
                f"e.g. {missing[0][:80]!r}"
            )
        return np.stack([lookup[k] for k in keys])

    return embed


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (cosine = dot product)."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
