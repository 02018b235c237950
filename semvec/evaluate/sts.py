"""STS: Spearman (and Pearson) correlation of the cosine of two sentences' vectors with the gold score."""

from __future__ import annotations

import numpy as np

from semvec import metrics
from semvec.datasets import Task, load_examples
from semvec.errors import ConfigError
from semvec.evaluate.vectors import Embed
from semvec.metrics import unit


def evaluate_sts(embed: Embed, path: str) -> dict:
    """Pairs in any layout semvec.datasets reads for the sts task (jsonl / csv / tsv / parquet, the
    STS-B and CNSD releases), local or s3://, optionally .gz. Each distinct sentence is embedded once."""
    rows = load_examples(Task.STS, path)
    if len(rows) < 2:
        raise ConfigError(f"{path!r} holds {len(rows)} sentence pair: a correlation needs at least 2")
    s1, s2 = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    score = np.array([r["score"] for r in rows], dtype=np.float64)
    if np.ptp(score) == 0:
        raise ConfigError(f"{path!r} gives every pair the score {score[0]:g}: a correlation needs gold "
                          "scores that differ")
    unique = sorted(set(s1) | set(s2))
    vectors = dict(zip(unique, unit(embed(unique)), strict=True))
    cos = np.array([float(vectors[a] @ vectors[b]) for a, b in zip(s1, s2, strict=True)])
    return {"pairs": len(s1), "spearman": metrics.spearman(cos, score),
            "pearson": metrics.pearson(cos, score)}
