"""A built index, opened for search: `semvec.search.open(uri).search(texts, k)`.

Queries are embedded with the model the indexed vectors came from (the reference, pooling,
normalisation and max length in the index's record) and the model's fingerprint is checked
first: a query embedded by another model would be scored against vectors it cannot be compared
with, so another model, or query vectors of another fingerprint, is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semvec import storage
from semvec.config import PARITY_DTYPES, DType
from semvec.errors import ConfigError
from semvec.metrics import unit
from semvec.search.config import IndexConfig
from semvec.search.store import IndexDir, faiss_module


@dataclass
class Hits:
    """One query's answer: ids best first, their cosine scores."""

    ids: list[str]
    scores: list[float]
    query_id: str | None = None

    def to_dict(self) -> dict:
        return {"query_id": self.query_id, "ids": self.ids, "scores": self.scores}


@dataclass
class SearchIndex:
    uri: str
    record: dict
    index: object  # a FAISS index
    ids: list[str]
    _encoders: dict = field(default_factory=dict, repr=False)

    @property
    def model(self) -> dict:
        return self.record["model"]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    def search_vectors(self, queries: np.ndarray, k: int = 10, ef_search: int | None = None,
                       nprobe: int | None = None) -> list[Hits]:
        """Query vectors [n, dim] (any length: scaled to unit here) -> the k nearest of each."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.record["dim"]:
            raise ConfigError(f"query vectors have dim {queries.shape[1]}, the index at "
                              f"{storage.display(self.uri)!r} holds dim {self.record['dim']}: embed "
                              "the queries with the index's model")
        self.check_tuning(k, ef_search, nprobe)
        self._tune(ef_search, nprobe)
        scores, labels = self.index.search(np.ascontiguousarray(unit(queries)), min(k, len(self.ids)))
        hits = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            kept = row_labels >= 0  # FAISS pads with -1 when fewer than k were reached
            hits.append(Hits([self.ids[i] for i in row_labels[kept]],
                             [round(float(s), 6) for s in row_scores[kept]]))
        return hits

    def check_tuning(self, k: int = 10, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """k and the search settings, each an integer >= 1 and of this index's kind, or a ConfigError."""
        for name, value in (("k", k), ("ef_search", ef_search), ("nprobe", nprobe)):
            if (value is not None or name == "k") and (not isinstance(value, int)
                                                       or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            kind = next(k.value for k, names in IndexConfig.TUNES.items() if name in names)
            if value is not None and self.kind != kind:
                raise ConfigError(f"{name} tunes {kind} indexes; the index at {storage.display(self.uri)!r} "
                                  f"is {self.kind}")

    def search(self, texts: list[str] | str, k: int = 10, model: str | None = None,
               **tuning) -> list[Hits]:
        """Embed texts with the index's model (or `model`, if it is the same model) and search."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for n, text in enumerate(texts, 1):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"query {n} of {len(texts)} is empty: a query needs text to embed")
        return self.search_vectors(self.embed(texts, model), k, **tuning)

    def embed(self, texts: list[str], model: str | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.record["dim"]), dtype=np.float32)
        return self.encoder(model).encode_texts(texts)

    def encoder(self, model: str | None = None):
        """The Encoder that embeds queries as the indexed vectors were embedded (cached)."""
        ref = model or self.model["reference"]
        if ref not in self._encoders:
            from semvec.encode import Encoder
            from semvec.models import fingerprint, resolve_model

            model_dir = resolve_model(ref)
            self.check_fingerprint(fingerprint(model_dir), f"model {ref!r}")
            m = self.model
            self._encoders[ref] = Encoder(model_dir, pooling=m["pooling"], normalize=m["normalize"],
                                          max_length=m["max_length"], dtype=query_dtype(m.get("dtype")),
                                          trust_remote_code=bool(m.get("trust_remote_code")))
        return self._encoders[ref]

    def check_fingerprint(self, found: str | None, what: str) -> None:
        want = self.model.get("fingerprint")
        if found != want:
            raise ConfigError(f"{what} has fingerprint {str(found)[:12]}, but the index at "
                              f"{storage.display(self.uri)!r} holds vectors of "
                              f"{self.model['reference']!r} (fingerprint {str(want)[:12]}): queries "
                              "must be embedded by the same model")

    def _tune(self, ef_search: int | None, nprobe: int | None) -> None:
        params = self.record["params"]
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or params["ef_search"])
        elif self.kind == "ivf":
            self.index.nprobe = int(nprobe or params["nprobe"])


def open_index(uri: str) -> SearchIndex:
    """The complete index at uri (local or s3://), its files checked against its record."""
    record, blob, ids = IndexDir(uri).read()
    index = faiss_module().deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    return SearchIndex(uri, record, index, ids)


def query_dtype(stored: str | None) -> DType:
    """The precision to embed queries in, from the one the indexed vectors were embedded in: any
    that holds the parity bar (within cosine 0.9999 of float32) gives the same vectors, so the
    fastest here (auto); a precision outside it (float16, bfloat16) is used again, so that queries
    and documents carry the same rounding. None (an index built before this was recorded): auto."""
    if stored is None or DType(stored) in PARITY_DTYPES:
        return DType.AUTO
    return DType(stored)
