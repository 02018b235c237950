"""Dev and test metrics for fine-tuning: Spearman (sts), accuracy and macro-F1 (classification),
entity-level P/R/F1 (ner, seqeval strict IOB2) and MRR / nDCG at k (pairs, binary relevance).

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


def ner_metrics(pred: list[list[str]], gold: list[list[str]]) -> dict:
    """Entity-level {"precision", "recall", "f1", "report"} with seqeval, strict IOB2.

    Strict: an entity counts only with the right type and span, and only when opened by B-; a
    predicted I- after O opens nothing. "report" is seqeval's per-type classification report.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    _same_length(pred, gold)
    for i, (p, g) in enumerate(zip(pred, gold, strict=True)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        bad = next((t for t in (*p, *g) if not _TAG.fullmatch(t)), None)
        if bad is not None:
            raise ValueError(f"sentence {i}: tag {bad!r} is not O, B-TYPE or I-TYPE")
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


def retrieval_mrr_ndcg(scores: np.ndarray, relevant: list[set[int]], k: int = 10) -> dict:
    """{"mrr@k", "ndcg@k"} with binary relevance, averaged over queries.

    scores: [n_queries, n_docs], higher is better; relevant[q]: indices of q's relevant docs (at
    least one). Equal scores rank by document index, so results do not depend on the sort.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[0] != len(relevant) or s.shape[1] == 0 or k < 1:
        raise ValueError(f"scores {s.shape} need one row per query ({len(relevant)}), >= 1 doc and k >= 1")
    top = _top_k(s, min(k, s.shape[1]))  # [n_queries, k']
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    mrr, ndcg = [], []
    for q, rel in enumerate(relevant):
        if not rel or min(rel) < 0 or max(rel) >= s.shape[1]:
            raise ValueError(f"query {q}: relevant {sorted(rel)[:5]} must be non-empty doc indices")
        hits = np.isin(top[q], list(rel))  # [k']
        first = np.flatnonzero(hits)
        mrr.append(1.0 / (first[0] + 1) if first.size else 0.0)
        ndcg.append(discount[:hits.size][hits].sum() / discount[:min(len(rel), k)].sum())
    return {f"mrr@{k}": float(np.mean(mrr)), f"ndcg@{k}": float(np.mean(ndcg))}


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    # A full stable argsort keeps ties in document order; chunks of ~16M scores bound its memory.
    rows = max(1, (1 << 24) // s.shape[1])
    return np.concatenate([np.argsort(-s[i:i + rows], axis=1, kind="stable")[:, :k]  # [rows, k]
                           for i in range(0, s.shape[0], rows)])


def _same_length(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need as many predictions as gold items (>= 1), got {len(pred)} and {len(gold)}")
