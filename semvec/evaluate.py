"""Evaluation: STS (Spearman of cosine vs gold score) and retrieval (nDCG@10, MRR@10, Recall@100).

Vectors come from a model (encoded here) or from a finished backfill output, looked up by id.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.errors import ConfigError

Embed = Callable[[list[str]], np.ndarray]


# ---------------------------------------------------------------- vector sources


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


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


# ---------------------------------------------------------------- STS


def read_sts(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """Pairs (sentence1, sentence2, score) in any layout fine-tuning reads: jsonl / csv / tsv /
    parquet, the STS-B and CNSD releases; local or s3://."""
    from semvec.train.data import Task, load_examples

    rows = load_examples(Task.STS, path)
    if not rows:
        raise ConfigError(f"data file {path!r} holds no sentence pairs")
    return ([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
            np.array([r["score"] for r in rows], dtype=np.float64))


def evaluate_sts(embed: Embed, path: str) -> dict:
    from scipy.stats import pearsonr, spearmanr

    s1, s2, score = read_sts(path)
    unique = sorted(set(s1) | set(s2))
    vectors = dict(zip(unique, _unit(embed(unique)), strict=True))
    cos = np.array([float(vectors[a] @ vectors[b]) for a, b in zip(s1, s2, strict=True)])
    return {
        "pairs": len(s1),
        "spearman": float(spearmanr(cos, score).statistic),
        "pearson": float(pearsonr(cos, score).statistic),
    }


# ---------------------------------------------------------------- retrieval


def read_beir(corpus: str, queries: str, qrels: str) -> tuple[dict, dict, dict]:
    """A BEIR layout (corpus.jsonl, queries.jsonl, qrels .tsv), local or on s3://."""
    def text(path: str) -> str:
        fs, where = storage.filesystem(path), storage.strip(path)
        if not fs.isfile(where):
            raise ConfigError(f"file {storage.display(path)!r} does not exist")
        return fs.cat_file(where).decode("utf-8-sig")

    def jsonl(path: str) -> list[dict]:
        return [json.loads(x) for x in text(path).splitlines() if x.strip()]

    docs = {str(d["_id"]): (d.get("title", "") + " " + d.get("text", "")).strip() for d in jsonl(corpus)}
    judged: dict[str, dict[str, int]] = {}
    for row in csv.DictReader(io.StringIO(text(qrels), newline=""), delimiter="\t"):
        if int(row["score"]) > 0:
            judged.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    qs = {str(q["_id"]): q["text"] for q in jsonl(queries) if str(q["_id"]) in judged}
    if not qs:
        raise ConfigError(f"no query in {queries!r} has a judgement in {qrels!r}")
    return docs, qs, judged


def evaluate_retrieval(embed_docs: Embed, embed_queries: Embed, corpus: str, queries: str,
                       qrels: str, by_id: bool = False) -> dict:
    """Exact cosine search. by_id: the embedders take ids (backfill vectors), else texts."""
    docs, qs, judged = read_beir(corpus, queries, qrels)
    doc_ids, q_ids = list(docs), list(qs)
    d = _unit(embed_docs(doc_ids if by_id else [docs[i] for i in doc_ids]))
    q = _unit(embed_queries(q_ids if by_id else [qs[i] for i in q_ids]))
    top = _top_k(q, d, 100)
    ndcg, mrr, recall = [], [], []
    for qi, qid in enumerate(q_ids):
        rel = judged[qid]
        ranked = [doc_ids[j] for j in top[qi]]
        dcg = sum(rel.get(doc, 0) / math.log2(r + 2) for r, doc in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        ndcg.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
        mrr.append(next((1 / (r + 1) for r, doc in enumerate(ranked[:10]) if doc in rel), 0.0))
        recall.append(len(set(ranked[:100]) & set(rel)) / len(rel))
    return {"queries": len(q_ids), "docs": len(doc_ids), "ndcg@10": float(np.mean(ndcg)),
            "mrr@10": float(np.mean(mrr)), "recall@100": float(np.mean(recall))}


def _top_k(q: np.ndarray, d: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    k = min(k, d.shape[0])
    out = []
    for s in range(0, q.shape[0], chunk):
        scores = q[s:s + chunk] @ d.T  # [chunk, n_docs]
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)
