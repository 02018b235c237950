"""Parity with sentence-transformers on real data, with the real bundled model (slow).

Needs ../shared/datasets/stsb (or SEMVEC_DATASETS); fails, not skips, when it is missing.
"""

import csv

import numpy as np
import pytest

from semvec import evaluate
from semvec.backfill.job import run
from semvec.config import load_embed_config
from semvec.models import resolve_model
from tests.conftest import DATASETS, write_jsonl

pytestmark = pytest.mark.slow

STSB_TEST = DATASETS / "stsb" / "sts-test.csv"


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    assert STSB_TEST.is_file(), f"STS-B test split not found at {STSB_TEST}; set SEMVEC_DATASETS"
    with open(STSB_TEST, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 1379
    return sorted({s for r in rows for s in (r[5], r[6])})


@pytest.fixture(scope="module")
def reference(sentences) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve_model("bundled")), device="cpu")
    return dict(zip(sentences, st.encode(sentences, batch_size=32), strict=True))


# Small batches over two actors on Ray, large ones in this process without Ray, and the
# reduced-precision mode the default may pick: vectors must not depend on batching, actor count,
# the way of running or that mode beyond the bar. The whole test
# split (2,700 sentences) once, for the Spearman; the other two on a seeded sample of it, enough
# to cross many batches (the bfloat16 run takes minutes on a CPU without bfloat16 instructions).
@pytest.mark.parametrize("workers,batch_tokens,batch_rows,dtype,sample", [
    (2, 1024, 64, "float32", 480), (1, 8192, 512, "float32", None),
    (1, None, 512, "bfloat16-mixed", 480),  # matrix products in bfloat16: held to the same bar
])
def test_backfill_vectors_match_sentence_transformers(
    ray_local, sentences, reference, tmp_path, workers, batch_tokens, batch_rows, dtype, sample
):
    if sample:
        sentences = sorted(map(str, np.random.default_rng(7).choice(sentences, sample, replace=False)))
    corpus = write_jsonl(tmp_path / "sts.jsonl", [{"text": s} for s in sentences])
    out = tmp_path / "vectors"
    summary = run(load_embed_config(
        None, input=str(corpus), output=str(out), id_field="text", max_workers=workers, cpus_per_worker=1,
        batch_tokens=batch_tokens, batch_rows=batch_rows, dtype=dtype,
        ray_from_rows=1 if workers > 1 else 20_000,  # two actors on Ray; else in this process
    ))
    assert summary["embedded"] == len(sentences)
    stored = evaluate.load_vectors(str(out))
    got = np.stack([stored[s] for s in sentences])
    want = np.stack([reference[s] for s in sentences])
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999
    if sample:
        return
    result = evaluate.evaluate_sts(evaluate.vector_embedder(str(out)), str(STSB_TEST))
    assert result["spearman"] == pytest.approx(0.8203, abs=0.001)
