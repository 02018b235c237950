"""Long documents: the window maths on real tokenizers, chunked backfills (local and S3), the
aggregate's formula, retrieval by best chunk, and the settings refused before any work."""

import glob
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semvec import evaluate
from semvec.backfill.job import run
from semvec.chunking import special_tokens, split, tokenize_whole, weighted_mean, windows
from semvec.cli import main
from semvec.config import EmbedConfig, load_embed_config
from semvec.encode import Encoder
from semvec.errors import ConfigError
from semvec.evaluate.retrieval import best_chunk_index
from semvec.testing import corpus_sentences
from semvec.tokens import load_tokenizer
from tests.conftest import VECTOR_ATOL, cli, write_jsonl


def long_and_short_texts(seed: int = 3) -> list[str]:
    """Texts of ~2 to ~300 tokens, punctuation and capitals included, so windows cut mid-sentence."""
    sentences = corpus_sentences(60, seed=seed)
    long = [". ".join(sentences[i:i + 12]).capitalize() + "!" for i in range(0, 48, 12)]
    return [*long, "a cat", sentences[50], "Hello, World!  two  spaces"]


def read_rows(out) -> pa.Table:
    parts = sorted(glob.glob(str(out / "part-*.parquet")))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _squash(text: str) -> str:
    # the tokenizer lowercases, and decoding spaces out punctuation; the tiny WordPiece tokenizer
    # has no decoder, so its continuation pieces keep their "##"
    return re.sub(r"\s+|##", "", text).lower()


# ---------------------------------------------------------------- window maths


def test_windows_cover_every_token_with_the_overlap_asked():
    for n in range(0, 40):
        for size in range(1, 9):
            for overlap in range(size):
                got = windows(n, size, overlap)
                assert got[0][0] == 0 and got[-1][1] == n
                assert all(b - a <= size for a, b in got)
                for (a0, b0), (a1, b1) in zip(got, got[1:], strict=False):
                    assert b0 - a0 == size and b0 - a1 == overlap and b1 > b0  # full, overlapping, new
    assert windows(5, 8, 2) == [(0, 5)]  # a text that fits is one window
    with pytest.raises(ValueError):
        windows(5, 4, 4)


@pytest.mark.parametrize("kind", ["bert", "gpt", "bundled"])
def test_chunks_point_into_the_text_and_lose_no_token(tiny_models, kind):
    from semvec.models import resolve_model

    tok = load_tokenizer(resolve_model("bundled") if kind == "bundled" else tiny_models[kind])
    k = special_tokens(tok)
    texts = long_and_short_texts()
    for text, (ids, special, offsets) in zip(texts, tokenize_whole(tok, texts), strict=True):
        content = ids[~special]
        c = split(ids, special, offsets, chunk_tokens=24, overlap=5)
        assert c.tokens == len(ids) and len(c.ids) == len(c.spans) == len(c.content)
        if len(content) <= 24 - k:
            assert len(c.ids) == 1 and (c.ids[0] == ids).all()  # as the model sees it whole
        pos = 0
        for n, (window, (start, end), count) in enumerate(zip(c.ids, c.spans, c.content, strict=True)):
            assert len(window) <= 24 and len(window) == count + k
            assert k in (0, 2)  # these tokenizers: nothing (GPT-2) or [CLS] ... [SEP] around a text
            body = window[1:-1] if k else window
            assert k == 0 or (window[0], window[-1]) == (ids[0], ids[-1])
            assert (body == content[pos:pos + count]).all()  # the next tokens, none lost
            assert 0 <= start < end <= len(text)
            assert _squash(tok.decode(body.tolist())) == _squash(text[start:end])
            if n:
                assert start <= c.spans[n - 1][1]  # spans overlap or touch: they cover the text
            pos += count - 5 if n < len(c.ids) - 1 else count
        assert pos == len(content)
        assert c.spans[0][0] == offsets[~special][0][0] and c.spans[-1][1] == offsets[~special][-1][1]


def test_the_weighted_mean_is_the_documented_formula():
    v = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    n = np.array([6, 3, 1])
    want = (6 * v[0] + 3 * v[1] + 1 * v[2]) / 10
    np.testing.assert_allclose(weighted_mean(v, n, normalize=False), want, rtol=1e-6)
    np.testing.assert_allclose(weighted_mean(v, n, normalize=True), want / np.linalg.norm(want), rtol=1e-6)


# ---------------------------------------------------------------- settings


def test_settings_that_cannot_work_are_refused_in_one_line(ray_local, tiny_models, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in long_and_short_texts()])
    base = {"input": str(src), "output": str(tmp_path / "out"), "model": str(tiny_models["bert"])}
    for kw, message in [({"aggregate": "mean"}, "aggregate 'mean' needs chunk_tokens"),
                        ({"chunk_overlap": 4}, "chunk_overlap 4 needs chunk_tokens"),
                        ({"chunk_tokens": 16, "granularity": "token"}, "granularity sentence only"),
                        ({"chunk_tokens": 16, "chunk_overlap": 16}, "must be below chunk_tokens"),
                        ({"chunk_tokens": 0}, "chunk_tokens must be a positive integer"),
                        ({"chunk_tokens": 16, "aggregate": "max"}, "aggregate 'max'")]:
        with pytest.raises(ConfigError, match=message):
            load_embed_config(None, **base, **kw)
    # against the model: its max_length (128 here, or as set) and its two special tokens
    for kw, message in [({"chunk_tokens": 200}, r"chunk_tokens 200 exceeds max_length 128 \(--max"),
                        ({"chunk_tokens": 64, "max_length": 32}, "exceeds max_length 32"),
                        ({"chunk_tokens": 10, "chunk_overlap": 8}, "chunk_overlap 8 must be from 0 to 7"),
                        ({"chunk_tokens": 2}, "leaves no room for text")]:
        with pytest.raises(ConfigError, match=message):
            run(load_embed_config(None, **base, **kw))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    code = main(["embed", str(src), str(tmp_path / "out"), "--model", str(tiny_models["bert"]),
                 "--chunk-tokens", "999"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "chunk_tokens (--chunk-tokens) 999" in err[0]


def test_existing_configs_keep_their_hash_and_chunking_changes_it():
    # the hash of this config before the chunk settings existed: old outputs are not refused
    assert EmbedConfig(input="in", output="out").output_hash("fp0") == "165dd0bf05fef927"
    chunked = {EmbedConfig(input="in", output="out", **kw).output_hash("fp0") for kw in (
        {"chunk_tokens": 64}, {"chunk_tokens": 64, "chunk_overlap": 8},
        {"chunk_tokens": 64, "aggregate": "mean"}, {"chunk_tokens": 128})}
    assert len(chunked) == 4 and "165dd0bf05fef927" not in chunked


# ---------------------------------------------------------------- backfill


def _chunks_by_encoder(model, texts, chunk_tokens, overlap):
    encoder = Encoder(model)
    return [(c, encoder.encode_ids(c.ids)[0]) for c in
            (split(*t, chunk_tokens, overlap) for t in tokenize_whole(encoder.tokenizer, texts))]


@pytest.mark.parametrize("kind, ray_from_rows", [("bert", 20_000), ("gpt", 1)],
                         ids=["bert-without-ray", "gpt-on-ray"])
def test_a_chunked_backfill_writes_one_row_per_chunk(ray_local, tiny_models, tmp_path, kind, ray_from_rows):
    texts = long_and_short_texts()
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    summary = run(load_embed_config(None, input=str(src), output=str(tmp_path / "out"),
                                    model=str(tiny_models[kind]), id_field="id", chunk_tokens=32,
                                    chunk_overlap=8, batch_rows=3, rows_per_file=4,
                                    ray_from_rows=ray_from_rows))
    table = read_rows(tmp_path / "out").sort_by([("row", "ascending"), ("chunk", "ascending")])
    assert table.column_names == ["id", "chunk", "start", "end", "embedding", "n_tokens", "truncated",
                                  "source", "row"]
    want = _chunks_by_encoder(tiny_models[kind], texts, 32, 8)
    assert summary["embedded"] == len(texts) and summary["chunks"] == table.num_rows
    assert summary["chunks"] == sum(len(c.ids) for c, _ in want) > 2 * len(texts)
    assert not any(table["truncated"].to_pylist())  # nothing cut: every token is in some chunk
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    at = 0
    for i, (c, v) in enumerate(want):
        rows = table.slice(at, len(c.ids)).to_pylist()
        assert [r["chunk"] for r in rows] == list(range(len(c.ids)))
        assert {(r["id"], r["row"]) for r in rows} == {(f"d{i}", i)}  # the document's id and row
        assert [[r["start"], r["end"]] for r in rows] == c.spans.tolist()
        assert all(0 <= r["start"] < r["end"] <= len(texts[i]) for r in rows)
        assert [r["n_tokens"] for r in rows] == [len(w) for w in c.ids]
        np.testing.assert_allclose(vectors[at:at + len(c.ids)], v, atol=VECTOR_ATOL)
        at += len(c.ids)
    m = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert m["totals"] == {"rows": len(texts), "embedded": len(texts), "quarantined": 0,
                           "chunks": table.num_rows}
    assert m["chunking"] == {"chunk_tokens": 32, "chunk_overlap": 8, "aggregate": "none"}
    assert m["duplicates"]["count"] == 0  # a document's chunks share its id: not duplicates


def test_aggregate_mean_is_the_token_weighted_mean_of_the_chunk_rows(ray_local, tiny_models, tmp_path):
    texts = long_and_short_texts(seed=4)
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    rows.insert(2, {"id": "bad", "text": "  "})  # quarantined as ever: one row, not chunked
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    kw = {"input": str(src), "model": str(tiny_models["bert"]), "id_field": "id", "chunk_tokens": 40,
          "chunk_overlap": 10, "normalize": True}
    run(load_embed_config(None, output=str(tmp_path / "chunks"), **kw))  # without Ray (this small)
    summary = run(load_embed_config(None, output=str(tmp_path / "mean"), aggregate="mean", ray_from_rows=1,
                                    **kw))  # on Ray: the two ways agree
    chunks, mean = read_rows(tmp_path / "chunks"), read_rows(tmp_path / "mean").sort_by("id")
    assert mean.column_names == ["id", "embedding", "n_tokens", "chunks", "truncated", "source", "row"]
    assert summary["embedded"] == len(texts) and summary["quarantined"] == 1
    assert summary["chunks"] == chunks.num_rows == sum(mean["chunks"].to_pylist())
    specials = 2  # [CLS] and [SEP] in each chunk's n_tokens
    for doc in mean.to_pylist():
        mine = chunks.filter(pa.compute.equal(chunks["id"], doc["id"])).to_pylist()
        v = np.array([r["embedding"] for r in mine], dtype=np.float64)
        n = np.array([r["n_tokens"] - specials for r in mine], dtype=np.float64)
        want = (n[:, None] * v).sum(0) / n.sum()
        want /= np.linalg.norm(want)  # normalised chunk vectors: the mean is renormalised
        assert doc["chunks"] == len(mine) and not doc["truncated"]
        np.testing.assert_allclose(doc["embedding"], want, atol=VECTOR_ATOL)
    assert len(glob.glob(str(tmp_path / "mean" / "_quarantine" / "part-*"))) == 1


def test_a_chunked_backfill_from_and_to_s3_resumes_like_any(ray_local, tiny_models, tmp_path, s3_env,
                                                            capsys):
    import fsspec

    # on the tests' Ray, whose workers hold the S3 server's credentials (conftest.ray_local)
    texts = long_and_short_texts(seed=5)
    local = write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    base = f"s3://{s3_env['bucket']}/chunked-{tmp_path.name}"
    fs = fsspec.filesystem("s3")
    fs.put(str(local), f"{base}/in/docs.jsonl")
    args = ["embed", f"{base}/in/", f"{base}/out", "--model", str(tiny_models["bert"]), "--id-field", "id",
            "--chunk-tokens", "48", "--chunk-overlap", "12", "--rows-per-file", "3", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    parts = sorted(p for p in fs.ls(f"{base}/out", detail=False) if p.rsplit("/", 1)[1].startswith("part-"))
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])
    assert summary["embedded"] == len(texts) and summary["chunks"] == table.num_rows > len(texts)
    assert len(parts) >= 3  # rows_per_file counts documents: 7 documents, at most 3 to a part
    for r in table.to_pylist():
        assert r["id"] == f"d{r['row']}" and texts[r["row"]][r["start"]:r["end"]].strip()
    code, out, err = cli(capsys, *args)
    assert code == 0, err[-2000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["rows_this_run"] == 0 and resumed["chunks"] == summary["chunks"]


# ---------------------------------------------------------------- evaluation


def test_best_chunk_scores_a_document_by_its_closest_chunk():
    stored = {"d1": np.array([[1, 0, 0], [0, 1, 0]], np.float32), "d2": np.array([[0.7, 0.7, 0]], np.float32),
              "d3": np.array([[0, 0, 1], [0.6, 0, 0.8], [0, 0.1, 1]], np.float32)}
    search = best_chunk_index(lambda keys: [stored[k] for k in keys])(["d1", "d2", "d3"])
    q = np.array([[0, 1, 0], [0.7, 0.7, 0.1], [0, 0, 1]], np.float32)
    # q1 is d1's second chunk; q2 is d2's only one; q3 is d3's first (d1's best is 0)
    assert search(q, 3).tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_retrieval_over_chunk_rows_and_sts_refused(ray_local, tiny_models, tmp_path):
    texts = long_and_short_texts(seed=6)
    docs = {f"d{i}": t for i, t in enumerate(texts)}
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d, "title": "", "text": t} for d, t in docs.items()])
    queries = {f"q{i}": " ".join(t.split()[5:12]) for i, t in enumerate(texts[:4])}
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": q, "text": t} for q, t in queries.items()])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                        + "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    files = {k: str(tmp_path / f) for k, f in (("corpus", "corpus.jsonl"), ("queries", "queries.jsonl"),
                                               ("qrels", "qrels.tsv"))}
    model = str(tiny_models["bert"])
    run(load_embed_config(None, input=files["corpus"], output=str(tmp_path / "d"), model=model,
                          id_field="_id", chunk_tokens=32, chunk_overlap=8))
    run(load_embed_config(None, input=files["queries"], output=str(tmp_path / "q"), model=model,
                          id_field="_id"))
    got = evaluate.evaluate("retrieval", vectors=str(tmp_path / "d"), query_vectors=str(tmp_path / "q"),
                            **files)
    # by hand: each query's cosine to each chunk row, the max per document, then the ranking
    chunks = read_rows(tmp_path / "d")
    qv = {r["id"]: np.array(r["embedding"]) for r in read_rows(tmp_path / "q").to_pylist()}
    cv = np.array(chunks["embedding"].to_pylist())
    cv /= np.linalg.norm(cv, axis=1, keepdims=True)
    owner = np.array(chunks["id"].to_pylist())
    rr = []
    for i in range(4):
        q = qv[f"q{i}"] / np.linalg.norm(qv[f"q{i}"])
        best = {d: (cv[owner == d] @ q).max() for d in docs}
        rank = sorted(docs, key=lambda d: (-best[d], list(docs).index(d))).index(f"d{i}") + 1
        rr.append(1 / rank if rank <= 10 else 0)
    assert got["docs"] == len(docs) and got["mrr@10"] == pytest.approx(np.mean(rr))
    with pytest.raises(ConfigError, match="give --query-vectors"):
        evaluate.evaluate("retrieval", vectors=str(tmp_path / "d"), **files)
    write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1}] * 2)
    with pytest.raises(ConfigError, match="one row per chunk, so a vector per id is ambiguous"):
        evaluate.evaluate("sts", vectors=str(tmp_path / "d"), data=str(tmp_path / "sts.jsonl"))


def test_the_precisions_that_hold_the_parity_bar_hash_alike():
    base = EmbedConfig(input="in", output="out").output_hash("fp0")
    assert {EmbedConfig(input="in", output="out", dtype=d).output_hash("fp0")
            for d in ("auto", "float32", "bfloat16-mixed")} == {base}
    assert len({base} | {EmbedConfig(input="in", output="out", dtype=d).output_hash("fp0")
                         for d in ("float16", "bfloat16")}) == 3
