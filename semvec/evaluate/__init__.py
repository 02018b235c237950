"""Evaluation: every evaluator semvec has, behind one entry point that `semvec evaluate`, training's
callers, retraining's suites and the benchmarks share.

| kind | data | metrics (the one a suite is judged by first) |
| sts | sentence pairs with a score | spearman, pearson (cosine of the vectors vs score) |
| retrieval | BEIR corpus, queries, qrels | ndcg@10, mrr@10, recall@100 (exact cosine search) |
| classification | text, label | accuracy, macro_f1 (a model trained with that task) |
| ner | CoNLL columns | f1, precision, recall (seqeval, entity level) |

STS and retrieval score a model's vectors, or vectors a backfill already wrote (looked up by id;
over a chunked output, one row per chunk, retrieval scores a document by its best chunk and STS
refuses); retrieval also scores a compressed output (`semvec compress`) as stored, its saved projection
applied to float query vectors; classification and NER score the head of a model that `semvec
train` wrote. Readers live in semvec.datasets, metrics in semvec.metrics.
"""

from __future__ import annotations

import json

from semvec import crashpoints, storage
from semvec.backfill.manifest import OutputDir
from semvec.compress.output import is_compressed
from semvec.datasets import METRIC, Kind
from semvec.errors import ConfigError
from semvec.evaluate.labelled import evaluate_labelled
from semvec.evaluate.retrieval import best_chunk_index, evaluate_retrieval
from semvec.evaluate.sts import evaluate_sts
from semvec.evaluate.vectors import (
    built_index,
    chunk_embedder,
    compressed_index,
    is_chunked,
    load_vectors,
    model_embedder,
    vector_embedder,
)

__all__ = ["Kind", "METRIC", "evaluate", "evaluate_labelled", "evaluate_retrieval", "evaluate_sts",
           "load_vectors", "model_embedder", "vector_embedder", "write_report"]


def evaluate(kind: Kind | str, *, model: str | None = None, vectors: str | None = None,
             query_vectors: str | None = None, data: str | None = None, corpus: str | None = None,
             queries: str | None = None, qrels: str | None = None, index: str | None = None) -> dict:
    """Score a model reference (default ``bundled``) or stored vectors on one kind of data.

    Returns the metrics; classification and NER add "per_label", "confusion" (rows: gold) and
    "report" (per label, text). Raises ConfigError
    for a missing file, a model of another task, or vectors that lack an id."""
    kind = Kind(kind)
    if kind in (Kind.CLASSIFICATION, Kind.NER):
        if vectors:
            raise ConfigError(f"evaluate {kind.value} scores a trained model's head: give --model, "
                              "not --vectors")
        return evaluate_labelled(_need(model, "model", kind), _need(data, "data", kind), kind.value)
    if kind == Kind.STS:
        if query_vectors or index:
            raise ConfigError("evaluate sts scores pairs of sentences: --query-vectors and --index are "
                              "retrieval's")
        _refuse_ignored(model, vectors, None, None)
        embed = vector_embedder(vectors) if vectors else model_embedder(model or "bundled")
        return evaluate_sts(embed, _need(data, "data", kind))
    files = [_need(corpus, "corpus", kind), _need(queries, "queries", kind), _need(qrels, "qrels", kind)]
    _refuse_ignored(model, vectors, query_vectors, index)
    if index:
        return _retrieval_on_index(index, files, model, vectors, query_vectors)
    if vectors and query_vectors:
        _same_model(vectors, query_vectors)
    if vectors and is_compressed(vectors):
        if not query_vectors:
            raise ConfigError(f"vectors {storage.display(vectors)!r} are compressed: give --query-vectors, "
                              "a backfill output of the queries' float vectors (the saved projection "
                              "is applied to them)")
        return evaluate_retrieval(None, vector_embedder(query_vectors), *files, by_id=True,
                                  index_docs=compressed_index(vectors))
    if vectors and is_chunked(vectors):  # one row per chunk: a document scores its best chunk
        if not query_vectors:
            raise ConfigError(f"vectors {storage.display(vectors)!r} hold one row per chunk: give "
                              "--query-vectors, a backfill output of the queries (one row each)")
        return evaluate_retrieval(None, vector_embedder(query_vectors), *files, by_id=True,
                                  index_docs=best_chunk_index(chunk_embedder(vectors)))
    if vectors:
        queries_from = vector_embedder(query_vectors) if query_vectors else vector_embedder(
            vectors, hint=": without --query-vectors the queries are looked up in --vectors; give "
                          "--query-vectors, a backfill output of the queries (--id-field _id)")
        return evaluate_retrieval(vector_embedder(vectors), queries_from, *files, by_id=True)
    embed = model_embedder(model or "bundled")
    return evaluate_retrieval(embed, embed, *files)


def _retrieval_on_index(index: str, files: list[str], model: str | None, vectors: str | None,
                        query_vectors: str | None) -> dict:
    """A built index searched as it serves: queries embedded by its model (checked), or stored
    query vectors of the same model's fingerprint."""
    if vectors:
        raise ConfigError("give --index or --vectors, not both: the index holds the documents")
    docs, opened = built_index(index)
    if query_vectors:
        manifest = OutputDir(query_vectors).read_manifest() or {}
        opened.check_fingerprint((manifest.get("model") or {}).get("fingerprint"),
                                 f"query vectors {storage.display(query_vectors)!r}")
        return evaluate_retrieval(None, vector_embedder(query_vectors), *files, by_id=True,
                                  index_docs=docs)
    opened.encoder(model)  # another model is refused before any query is embedded
    return evaluate_retrieval(None, lambda texts: opened.embed(texts, model), *files, index_docs=docs)


def _refuse_ignored(model: str | None, vectors: str | None, query_vectors: str | None,
                    index: str | None) -> None:
    """A flag that the chosen way of scoring would not read was ignored without a word."""
    if query_vectors and not (vectors or index):
        raise ConfigError("--query-vectors goes with --vectors or --index (the documents' stored "
                          "vectors); to embed the queries with a model, give --model alone")
    if model and vectors:
        raise ConfigError("give --model or --vectors, not both: stored vectors are scored as they are")
    if model and index and query_vectors:
        raise ConfigError("--model embeds the queries for --index; with --query-vectors nothing is "
                          "embedded: drop one")


def _same_model(vectors: str, query_vectors: str) -> None:
    """Query vectors of another model than the documents' (an older model of the same dim, say)
    would be scored as if they matched: refused by fingerprint, as an index refuses them."""
    docs = OutputDir(vectors).read_manifest() or {}
    model = docs.get("model") or (docs.get("source") or {}).get("model") or {}  # compressed: its source's
    found = ((OutputDir(query_vectors).read_manifest() or {}).get("model") or {}).get("fingerprint")
    # no fingerprint: not a backfill output (compressed, say), refused as such when read
    if model.get("fingerprint") and found and found != model["fingerprint"]:
        raise ConfigError(f"query vectors {storage.display(query_vectors)!r} have fingerprint "
                          f"{str(found)[:12]}, but the vectors at {storage.display(vectors)!r} are of "
                          f"{model.get('reference')!r} (fingerprint {model['fingerprint'][:12]}): "
                          "queries must be embedded by the same model")


def _need(value: str | None, name: str, kind: Kind) -> str:
    if not value:
        raise ConfigError(f"evaluate {kind.value} needs --{name}")
    return value


def write_report(result: dict, uri: str) -> None:
    """The result as JSON at uri (local or s3://), written whole."""
    crashpoints.arm()
    storage.put_atomic(uri, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
