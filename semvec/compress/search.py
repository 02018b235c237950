"""Exact search of float queries over compressed vectors, read as stored (nothing is decoded to the
source's dim): the saved projection maps the queries, then

    float (PCA only)  (C q) . y
    int8              (C q) . (codes * scale + offset)
    binary            Hamming distance of sign bits for all documents, then the best `candidates`
                      (default 100) rescored as int8

(see semvec.compress.codec for why (C q) . y ranks as cosine). Used by `semvec evaluate retrieval
--vectors COMPRESSED --query-vectors FLOAT`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semvec import metrics, storage
from semvec.compress.codec import Codec, Encoded, binarize, hamming
from semvec.compress.config import Quantize
from semvec.compress.output import open_complete
from semvec.errors import ConfigError

CANDIDATES = 100  # binary: documents per query rescored with their int8 codes
QUERY_CHUNK = 256  # queries scored at once: a [chunk, n_docs] score matrix in memory


@dataclass(frozen=True)
class CompressedVectors:
    """The vectors of a complete compressed output, in memory as stored, with their codec."""

    uri: str
    ids: list[str]
    codec: Codec
    stored: Encoded

    @classmethod
    def load(cls, uri: str) -> CompressedVectors:
        out, codec, _ = open_complete(uri)
        parts = [out.read_part(p) for p in out.list_parts()]
        if not parts:
            raise ConfigError(f"compressed vectors {storage.display(uri)!r} hold no parts")
        ids = [key for part_ids, _ in parts for key in part_ids]
        return cls(uri, ids, codec, _concat([encoded for _, encoded in parts]))

    def take(self, keys: list[str]) -> CompressedVectors:
        """The vectors of these ids, in this order (the first stored wins for a repeated id)."""
        where: dict[str, int] = {}
        for i, key in enumerate(self.ids):
            where.setdefault(key, i)
        missing = [k for k in keys if k not in where]
        if missing:
            raise ConfigError(f"{len(missing)} ids are not in the compressed vectors at "
                              f"{storage.display(self.uri)!r}, e.g. {missing[0][:80]!r}")
        rows = np.array([where[k] for k in keys], dtype=np.int64)
        return CompressedVectors(self.uri, list(keys), self.codec, _take(self.stored, rows))

    def search(self, queries: np.ndarray, k: int, candidates: int = CANDIDATES) -> np.ndarray:
        """Float queries [n, dim_in] -> [n, min(k, n_docs)] document indices, best first."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.codec.dim_in:
            raise ConfigError(f"query vectors have dim {queries.shape[-1]}, but the vectors at "
                              f"{storage.display(self.uri)!r} were compressed from dim "
                              f"{self.codec.dim_in}: embed the queries with the same model")
        return np.concatenate([self._search_chunk(queries[s:s + QUERY_CHUNK], k, candidates)
                               for s in range(0, len(queries), QUERY_CHUNK)])

    def _search_chunk(self, q: np.ndarray, k: int, candidates: int) -> np.ndarray:
        mapped = self.codec.query(q)  # [n, dim]
        if self.codec.quantize != Quantize.BINARY:
            return metrics.top_k(self._scores(mapped), k)
        # Hamming on the bits, for every document; the query is binarised as the documents were
        bits = binarize(self.codec.project(q), self.codec.thresholds)
        shortlist = metrics.top_k(-hamming(bits, self.stored.bits), max(candidates, k))  # [n, c]
        out = np.empty((len(q), min(k, shortlist.shape[1])), dtype=np.int64)
        for i, rows in enumerate(shortlist):
            codes = Encoded(codes=self.stored.codes[rows])
            scores = self.codec.decode(codes) @ mapped[i]  # [c]
            out[i] = rows[np.lexsort((rows, -scores))[:out.shape[1]]]  # ties: by document index
        return out

    def _scores(self, mapped: np.ndarray) -> np.ndarray:
        """[n, dim] mapped queries -> [n, n_docs] scores over the stored vectors."""
        if self.stored.vectors is not None:
            return mapped @ self.stored.vectors.T
        # q . (codes * scale + offset) = (q * scale) . codes + q . offset: the scale is folded
        # into the queries; the codes are widened to float32 for the product, one chunk of
        # queries at a time (briefly the memory the float vectors would take)
        return (mapped * self.codec.scale) @ self.stored.codes.T.astype(np.float32) \
            + (mapped @ self.codec.offset)[:, None]


def _concat(parts: list[Encoded]) -> Encoded:
    def joined(name: str) -> np.ndarray | None:
        arrays = [getattr(e, name) for e in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return Encoded(joined("vectors"), joined("codes"), joined("bits"))


def _take(stored: Encoded, rows: np.ndarray) -> Encoded:
    return Encoded(*[None if a is None else a[rows] for a in (stored.vectors, stored.codes, stored.bits)])
