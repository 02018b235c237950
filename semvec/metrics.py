"""Every metric semvec reports, one implementation each, for training's dev checks and for
`semvec evaluate`: Spearman and Pearson (sts), accuracy and macro-F1 (classification), entity-level
P/R/F1 (ner, seqeval strict IOB2), per-label reports and confusion matrices, and nDCG@k / MRR@k /
Recall@k (retrieval: graded relevance, equal scores ranked by document index).

Inputs that cannot be scored (lengths that differ, nothing to score) raise ValueError: they are
bugs in the caller, not bad user data.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np

_TAG = re.compile(r"O|[BI]-\S+")


def spearman(pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of predicted vs gold scores; nan when either side is constant."""
    from scipy.stats import spearmanr

    p, g = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if p.ndim != 1 or p.shape != g.shape or p.size < 2:
        raise ValueError(f"spearman needs two 1-d arrays of one length >= 2, got {p.shape} and {g.shape}")
    if np.ptp(p) == 0 or np.ptp(g) == 0:
        return float("nan")  # undefined; scipy would return nan too, with a warning
    return float(spearmanr(p, g).statistic)


def classification_metrics(pred: list[str], gold: list[str]) -> dict:
    """{"accuracy", "macro_f1"}; macro over every label in gold or pred, F1 0 where undefined."""
    from sklearn.metrics import accuracy_score, f1_score

    _same_length(pred, gold)
    return {"accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0))}


def label_report(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict:
    """Per label {"precision", "recall", "f1", "support"}, the confusion matrix (rows: gold,
    columns: predicted) and sklearn's text report, over labels in their order (then any label
    seen in pred or gold but not given); a label that nobody holds or predicts scores 0."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    _same_length(pred, gold)
    labels = list(labels) + sorted((set(pred) | set(gold)) - set(labels))
    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    return {"per_label": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(support[i])} for i, lab in enumerate(labels)},
            "confusion": {"labels": labels, "rows": "gold", "columns": "predicted",
                          "matrix": confusion_matrix(gold, pred, labels=labels).tolist()},
            "report": classification_report(gold, pred, labels=labels, digits=4, zero_division=0)}


def _check_tags(pred: list[list[str]], gold: list[list[str]]) -> None:
    _same_length(pred, gold)
    for i, (p, g) in enumerate(zip(pred, gold, strict=True)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        bad = next((t for t in (*p, *g) if not _TAG.fullmatch(t)), None)
        if bad is not None:
            raise ValueError(f"sentence {i}: tag {bad!r} is not O, B-TYPE or I-TYPE")


def ner_label_report(pred: list[list[str]], gold: list[list[str]], tags: Sequence[str]) -> dict:
    """Per entity type {"precision", "recall", "f1", "support"} (seqeval strict IOB2, as
    ner_metrics) and the confusion matrix of the tags token by token (rows: gold)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    _check_tags(pred, gold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            by_type = classification_report(gold, pred, mode="strict", scheme=IOB2, zero_division=0,
                                            output_dict=True)
        except ValueError:  # neither side holds an entity
            by_type = {}
    per_type = {t: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                    "f1": float(v["f1-score"]), "support": int(v["support"])}
                for t, v in by_type.items() if not t.endswith(" avg")}
    tokens = label_report([t for s in pred for t in s], [t for s in gold for t in s], tags)
    return {"per_label": per_type, "confusion": tokens["confusion"]}


def ner_metrics(pred: list[list[str]], gold: list[list[str]]) -> dict:
    """Entity-level {"precision", "recall", "f1", "report"} with seqeval, strict IOB2.

    Strict: an entity counts only with the right type and span, and only when opened by B-; a
    predicted I- after O opens nothing. "report" is seqeval's per-type classification report.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    _check_tags(pred, gold)
    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns per sentence on ill-formed predictions
        scores = {"precision": float(precision_score(gold, pred, **kw)),
                  "recall": float(recall_score(gold, pred, **kw)),
                  "f1": float(f1_score(gold, pred, **kw))}
        try:
            report = classification_report(gold, pred, digits=4, **kw)
        except ValueError:  # seqeval cannot lay out a report when neither side has an entity
            report = "no entities in gold or predictions\n"
    return {**scores, "report": report}


def pearson(pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of predicted vs gold scores; nan when either side is constant."""
    p, g = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if p.ndim != 1 or p.shape != g.shape or p.size < 2:
        raise ValueError(f"pearson needs two 1-d arrays of one length >= 2, got {p.shape} and {g.shape}")
    if np.ptp(p) == 0 or np.ptp(g) == 0:
        return float("nan")
    return float(np.corrcoef(p, g)[0, 1])


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n_queries, n_docs] scores (higher is better) -> [n_queries, min(k, n_docs)] doc indices, best
    first; equal scores rank by document index, so results do not depend on the sort."""
    s = np.asarray(scores)
    k = min(k, s.shape[1])
    if k == s.shape[1]:
        return np.argsort(-s, axis=1, kind="stable")
    # The k-th best score of each row (a partial sort, linear in n_docs); every document scoring
    # at least that is a candidate: the top k plus any tied with the k-th. Candidates sort by
    # (-score, index).
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]  # [n_queries]
    out = np.empty((s.shape[0], k), dtype=np.int64)
    for q in range(s.shape[0]):
        candidates = np.flatnonzero(s[q] >= kth[q])
        order = np.lexsort((candidates, -s[q, candidates]))
        out[q] = candidates[order[:k]]
    return out


def ranking_metrics(top: np.ndarray, relevant: Sequence[dict[int, float]], k: int = 10,
                    recall_at: int | None = None) -> dict:
    """nDCG@k (graded gains, log2 discount), MRR@k and, when asked, Recall@recall_at, averaged over
    queries. top: [n_queries, >= k] ranked doc indices (see top_k); relevant[q]: {doc index: gain > 0}
    for query q, at least one."""
    top = np.asarray(top)
    if top.ndim != 2 or top.shape[0] != len(relevant) or k < 1:
        raise ValueError(f"top {top.shape} needs one row per query ({len(relevant)}) and k >= 1")
    discount = 1.0 / np.log2(np.arange(2, max(k, 1) + 2))  # [k]
    ndcg, mrr, recall = [], [], []
    for q, rel in enumerate(relevant):
        if not rel or min(rel.values()) <= 0:
            raise ValueError(f"query {q}: relevant {dict(list(rel.items())[:5])} needs a doc with gain > 0")
        gains = np.array([rel.get(int(d), 0.0) for d in top[q, :k]], dtype=float)  # [k']
        ideal = np.sort(np.fromiter(rel.values(), dtype=float))[::-1][:k]
        ndcg.append(float(gains @ discount[:gains.size]) / float(ideal @ discount[:ideal.size]))
        first = np.flatnonzero(gains > 0)
        mrr.append(1.0 / (first[0] + 1) if first.size else 0.0)
        if recall_at:
            recall.append(len(set(top[q, :recall_at].tolist()) & set(rel)) / len(rel))
    out = {f"ndcg@{k}": float(np.mean(ndcg)), f"mrr@{k}": float(np.mean(mrr))}
    if recall_at:
        out[f"recall@{recall_at}"] = float(np.mean(recall))
    return out


def retrieval_mrr_ndcg(scores: np.ndarray, relevant: list[set[int]], k: int = 10) -> dict:
    """{"mrr@k", "ndcg@k"} with binary relevance from a [n_queries, n_docs] score matrix."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[0] != len(relevant) or s.shape[1] == 0 or k < 1:
        raise ValueError(f"scores {s.shape} need one row per query ({len(relevant)}), >= 1 doc and k >= 1")
    for q, rel in enumerate(relevant):
        if not rel or min(rel) < 0 or max(rel) >= s.shape[1]:
            raise ValueError(f"query {q}: relevant {sorted(rel)[:5]} must be non-empty doc indices")
    result = ranking_metrics(top_k(s, k), [dict.fromkeys(rel, 1.0) for rel in relevant], k)
    return {f"mrr@{k}": result[f"mrr@{k}"], f"ndcg@{k}": result[f"ndcg@{k}"]}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that dot products are cosines (a zero row stays zero)."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _same_length(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need as many predictions as gold items (>= 1), got {len(pred)} and {len(gold)}")
