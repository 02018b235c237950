"""Retrieval on BEIR files: exact cosine search of every query over the whole corpus, scored with
nDCG@10, MRR@10 and Recall@100 against graded judgements."""

from __future__ import annotations

import numpy as np

from semvec import metrics
from semvec.datasets import read_beir
from semvec.evaluate.vectors import Embed, unit

K, RECALL_AT = 10, 100
QUERY_CHUNK = 256  # queries scored at once: [chunk, n_docs] float32 scores in memory


def evaluate_retrieval(embed_docs: Embed, embed_queries: Embed, corpus: str, queries: str,
                       qrels: str, by_id: bool = False) -> dict:
    """by_id: the embedders take ids (stored vectors), else texts (documents are title + text)."""
    docs, qs, judged = read_beir(corpus, queries, qrels)
    doc_ids, q_ids = list(docs), list(qs)
    index = {d: i for i, d in enumerate(doc_ids)}
    d = unit(embed_docs(doc_ids if by_id else [docs[i] for i in doc_ids]))  # [n_docs, dim]
    q = unit(embed_queries(q_ids if by_id else [qs[i] for i in q_ids]))  # [n_queries, dim]
    top = np.concatenate([metrics.top_k(q[s:s + QUERY_CHUNK] @ d.T, RECALL_AT)
                          for s in range(0, q.shape[0], QUERY_CHUNK)])  # [n_queries, <= 100]
    # judged documents missing from the corpus can never be found; they still count as relevant
    relevant = [{index.get(doc, -1 - n): float(g) for n, (doc, g) in enumerate(judged[qid].items())}
                for qid in q_ids]
    return {"queries": len(q_ids), "docs": len(doc_ids),
            **metrics.ranking_metrics(top, relevant, K, recall_at=RECALL_AT)}
