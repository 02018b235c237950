"""Retrieval on BEIR files: exact cosine search of every query over the whole corpus, scored with
nDCG@10, MRR@10 and Recall@100 against graded judgements. Over a chunked output (one row per
chunk) a document scores the cosine of its best chunk."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from semvec import metrics, storage
from semvec.datasets import read_beir
from semvec.errors import ConfigError
from semvec.evaluate.vectors import DocIndex, Embed, Search
from semvec.metrics import unit

K, RECALL_AT = 10, 100
QUERY_CHUNK = 256  # queries scored at once: [chunk, n_docs] float32 scores in memory
log = logging.getLogger("semvec.evaluate")


def exact_index(embed: Embed) -> DocIndex:
    """Exact cosine search over the vectors embed gives the docs."""
    def index(keys: list[str]) -> Search:
        d = unit(embed(keys))  # [n_docs, dim]

        def search(q: np.ndarray, k: int) -> np.ndarray:
            q = unit(q)
            return np.concatenate([metrics.top_k(q[s:s + QUERY_CHUNK] @ d.T, k)
                                   for s in range(0, q.shape[0], QUERY_CHUNK)])
        return search
    return index


def best_chunk_index(chunks: Callable[[list[str]], list[np.ndarray]]) -> DocIndex:
    """Exact cosine search over every chunk; a document scores its best chunk's cosine."""
    def index(keys: list[str]) -> Search:
        per_doc = chunks(keys)  # each [n_chunks_i, dim], n_chunks_i >= 1
        d = unit(np.concatenate(per_doc))  # [all chunks, dim], grouped by document in keys' order
        starts = np.r_[0, np.cumsum([len(c) for c in per_doc])[:-1]]

        def search(q: np.ndarray, k: int) -> np.ndarray:
            q = unit(q)
            return np.concatenate([
                metrics.top_k(np.maximum.reduceat(q[s:s + QUERY_CHUNK] @ d.T, starts, axis=1), k)
                for s in range(0, q.shape[0], QUERY_CHUNK)])  # the max over each doc's chunks
        return search
    return index


def evaluate_retrieval(embed_docs: Embed | None, embed_queries: Embed, corpus: str, queries: str,
                       qrels: str, by_id: bool = False, index_docs: DocIndex | None = None) -> dict:
    """by_id: the embedders take ids (stored vectors), else texts (documents are title + text).
    index_docs: how the docs are searched, given their ids (compressed vectors, a built index);
    default exact cosine search over embed_docs' vectors."""
    docs, qs, judged = read_beir(corpus, queries, qrels)
    if not docs:
        raise ConfigError(f"corpus {storage.display(corpus)!r} holds no documents")
    if not {d for q in qs for d in judged.get(q, {})} & set(docs):
        raise ConfigError(f"none of the documents the qrels judge for these queries is in corpus "
                          f"{storage.display(corpus)!r}: check that qrels and corpus belong together "
                          "(the qrels' corpus-id is the corpus's _id)")
    doc_ids, q_ids = list(docs), list(qs)
    index = {d: i for i, d in enumerate(doc_ids)}
    search = (index_docs(doc_ids) if index_docs
              else exact_index(embed_docs)(doc_ids if by_id else [docs[i] for i in doc_ids]))
    q = embed_queries(q_ids if by_id else [qs[i] for i in q_ids])  # [n_queries, dim]
    top = search(q, RECALL_AT)  # [n_queries, <= 100]
    # judged documents missing from the corpus can never be found; they still count as relevant
    relevant = [{index.get(doc, -1 - n): float(g) for n, (doc, g) in enumerate(judged[qid].items())}
                for qid in q_ids]
    absent = [doc for qid in q_ids for doc in judged[qid] if doc not in index]
    if absent:
        log.warning("%d judgement(s) of these queries name documents not in corpus %s (e.g. %r): they "
                    "count as relevant and can never be found", len(absent), storage.display(corpus),
                    absent[0][:80])
    return {"queries": len(q_ids), "docs": len(doc_ids), "judged_not_in_corpus": len(absent),
            **metrics.ranking_metrics(top, relevant, K, recall_at=RECALL_AT)}
