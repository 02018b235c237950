"""Evaluation metrics on hand-checked cases, and evaluation from stored backfill vectors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from semvec import evaluate
from semvec.backfill.job import run
from semvec.cli import main
from semvec.config import load_embed_config
from semvec.datasets import read_beir
from semvec.errors import ConfigError
from tests.conftest import REPO, write_jsonl

# Three docs on three axes; queries point at them, so the ranking is known by construction.
AXES = {"d1": [1, 0, 0], "d2": [0, 1, 0], "d3": [0, 0, 1]}


def _beir(tmp_path, qrels_rows):
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d, "title": "", "text": d} for d in AXES])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": q, "text": q} for q in ("q1", "q2")])
    (tmp_path / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels_rows))
    return [str(tmp_path / f) for f in ("corpus.jsonl", "queries.jsonl", "qrels.tsv")]


def _embed(table):
    return lambda keys: np.array([table[k] for k in keys], dtype=np.float32)


def test_retrieval_metrics_by_hand(tmp_path):
    # q1 ranks d1 > d2 > d3; q2 ranks d3 > d2 > d1.
    queries = {"q1": [1, 0.5, 0.1], "q2": [0.1, 0.5, 1]}
    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1)])
    r = evaluate.evaluate_retrieval(_embed(AXES), _embed(queries), *files, by_id=True)
    # q1: hit at rank 1 -> nDCG 1, RR 1. q2: hit at rank 2 -> nDCG 1/log2(3), RR 1/2.
    assert r["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert r["mrr@10"] == pytest.approx(0.75)
    assert r["recall@100"] == 1.0 and r["judged_not_in_corpus"] == 0


def test_judged_documents_missing_from_the_corpus_count_and_are_said(tmp_path, caplog):
    """They were silent misses: recall fell and nothing said why."""
    queries = {"q1": [1, 0.5, 0.1], "q2": [0.1, 0.5, 1]}
    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1), ("q2", "gone", 1)])
    r = evaluate.evaluate_retrieval(_embed(AXES), _embed(queries), *files, by_id=True)
    assert r["judged_not_in_corpus"] == 1 and r["recall@100"] == pytest.approx(0.75)
    assert "1 judgement(s) of these queries name documents not in corpus" in caplog.text
    assert "'gone'" in caplog.text
    # a repeated document id kept its last record without a word
    with open(files[0], "a") as f:
        f.write(json.dumps({"_id": "d2", "title": "", "text": "again"}) + "\n")
    assert read_beir(*files)[0]["d2"] == "again"
    assert "1 document(s) repeat an _id another has (e.g. 'd2'); the last of each is scored" in caplog.text


def test_a_retrieval_suite_on_s3_reads_as_the_local_one(tmp_path, s3_env):
    import fsspec

    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1)])
    fs = fsspec.filesystem("s3")
    remote = [f"s3://{s3_env['bucket']}/beir-{tmp_path.name}/{f.rsplit('/', 1)[1]}" for f in files]
    for local, uri in zip(files, remote, strict=True):
        fs.put(local, uri)
    assert read_beir(*remote) == read_beir(*files)
    with pytest.raises(ConfigError, match="does not exist"):
        read_beir(remote[0], remote[1], remote[2] + "-gone")


def test_sts_reads_the_stsb_release_format_and_csv(tmp_path):
    vectors = {"a b": [1, 0], "a c": [0.9, 0.1], "x y": [0, 1], "x z": [0.2, 0.9]}
    release = "\n".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}" for i, (s, a, b) in enumerate(
        [(5.0, "a b", "a c"), (0.5, "a b", "x y"), (2.0, "a c", "x z")]))
    (tmp_path / "sts.tsv").write_text(release + "\n")
    r = evaluate.evaluate_sts(_embed(vectors), str(tmp_path / "sts.tsv"))
    assert r["pairs"] == 3 and r["spearman"] == pytest.approx(1.0)
    (tmp_path / "sts.csv").write_text("sentence1,sentence2,score\na b,a c,5\na b,x y,0.5\na c,x z,2\n")
    assert evaluate.evaluate_sts(_embed(vectors), str(tmp_path / "sts.csv"))["spearman"] == pytest.approx(1.0)


def test_sts_from_backfill_vectors_equals_sts_from_the_model(ray_local, tiny_models, tmp_path, capsys):
    pairs = [("the cat sat", "a cat sat on the mat", 4.0), ("the dog ran", "red car", 0.5),
             ("blue river", "the blue river", 4.5), ("fire", "water and earth", 1.0)]
    data = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in pairs])
    sentences = sorted({x for a, b, _ in pairs for x in (a, b)})
    corpus = write_jsonl(tmp_path / "sents.jsonl", [{"text": s} for s in sentences])
    out = tmp_path / "vectors"
    run(load_embed_config(None, input=str(corpus), output=str(out), model=str(tiny_models["bert"]),
                          id_field="text"))
    assert main(["evaluate", "sts", "--data", str(data), "--vectors", str(out), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["evaluate", "sts", "--data", str(data), "--model", str(tiny_models["bert"]), "--json"]) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stored["spearman"] == pytest.approx(direct["spearman"], abs=1e-6)


def test_missing_ids_in_vectors_are_a_clear_error(ray_local, tiny_models, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "s.jsonl", [{"text": "only this"}])
    run(load_embed_config(None, input=str(corpus), output=str(tmp_path / "v"),
                          model=str(tiny_models["bert"]), id_field="text"))
    pairs = [{"sentence1": "only this", "sentence2": "not there", "score": 1},
             {"sentence1": "only this", "sentence2": "only this", "score": 5}]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    assert main(["evaluate", "sts", "--data", str(data), "--vectors", str(tmp_path / "v")]) == 2
    assert "1 ids are not in the vectors" in capsys.readouterr().err
    one = write_jsonl(tmp_path / "one.jsonl", pairs[1:])
    assert main(["evaluate", "sts", "--data", str(one), "--vectors", str(tmp_path / "v")]) == 2
    assert "holds 1 sentence pair: a correlation needs at least 2" in capsys.readouterr().err


def test_graded_ndcg_mrr_and_recall_on_a_hand_checked_ranking():
    from semvec.metrics import ranking_metrics, top_k

    scores = np.array([[0.9, 0.8, 0.8, 0.1]])  # docs 1 and 2 tie: the lower index ranks first
    top = top_k(scores, 4)
    assert top.tolist() == [[0, 1, 2, 3]]
    # relevant: doc 2 with gain 2, doc 3 with gain 1; ranked at positions 3 and 4
    got = ranking_metrics(top, [{2: 2.0, 3: 1.0}], k=3, recall_at=2)
    dcg = 2 / np.log2(4)  # only doc 2 is in the top 3
    ideal = 2 / np.log2(2) + 1 / np.log2(3)
    assert got == pytest.approx({"ndcg@3": dcg / ideal, "mrr@3": 1 / 3, "recall@2": 0.0})


def test_gzipped_beir_files_and_a_json_report(tmp_path):
    import gzip

    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1)])
    zipped = []
    for f in files:
        target = f + ".gz"
        with open(f, "rb") as src, gzip.open(target, "wb") as dst:
            dst.write(src.read())
        zipped.append(target)
    assert read_beir(*zipped) == read_beir(*files)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"_id": "d1"}\n')[:-8])
    with pytest.raises(ConfigError, match="not a whole gzip file"):
        read_beir(str(tmp_path / "broken.jsonl.gz"), zipped[1], zipped[2])
    report = tmp_path / "reports" / "r.json"
    result = evaluate.evaluate_retrieval(_embed(AXES), _embed({"q1": [1, 0, 0], "q2": [0, 1, 0]}),
                                         *zipped, by_id=True)
    evaluate.write_report(result, str(report))
    assert json.loads(report.read_text()) == result and result["ndcg@10"] == 1.0


def test_a_report_crashed_after_its_write_then_rerun(tmp_path, tiny_models):
    """The report's one write is the whole file (a rename): a SIGKILL right after it leaves the
    whole report and no temporary, and the rerun writes the same result over it."""
    rows = [{"sentence1": f"the cat {i}", "sentence2": f"a dog {i % 3}", "score": i % 5} for i in range(12)]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    report = tmp_path / "out" / "r.json"
    args = ["evaluate", "sts", "--model", str(tiny_models["bert"]), "--data", str(data),
            "--report", str(report)]
    crashed = subprocess.run([sys.executable, "-m", "semvec.cli", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "SEMVEC_CRASH_AT": "1"})
    assert crashed.returncode == -9, crashed.stderr[-1500:]
    first = json.loads(report.read_text())
    assert first["kind"] == "sts" and first["pairs"] == 12
    assert main(args) == 0
    assert json.loads(report.read_text()) == first
    assert [p.name for p in report.parent.iterdir()] == ["r.json"]  # no temporary left


def test_top_k_ranks_ties_by_document_index_like_a_full_stable_sort():
    from semvec.metrics import top_k

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, q, k = rng.integers(1, 50), rng.integers(1, 5), rng.integers(1, 60)
        scores = rng.integers(0, 5, (q, n)).astype(float)  # many ties, at the k-th place too
        want = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, n)]
        assert (top_k(scores, k) == want).all()


def test_scores_that_cannot_mean_anything_are_refused(tmp_path):
    # an empty corpus, qrels of another corpus, constant gold scores: each scored 0 or nan, exit 0
    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1)])
    r = evaluate.evaluate_retrieval(_embed(AXES), _embed({"q1": [1, 0, 0], "q2": [0, 1, 0]}), *files,
                                    by_id=True)
    assert r["ndcg@10"] == 1.0  # the suite itself is fine
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="corpus '.*empty.jsonl' holds no documents"):
        evaluate.evaluate_retrieval(_embed(AXES), _embed({}), str(tmp_path / "empty.jsonl"), *files[1:],
                                    by_id=True)
    (tmp_path / "other.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tx1\t1\nq2\tx2\t1\n")
    with pytest.raises(ConfigError, match="none of the documents the qrels judge .* is in corpus"):
        evaluate.evaluate_retrieval(_embed(AXES), _embed({}), files[0], files[1], str(tmp_path / "other.tsv"),
                                    by_id=True)
    write_jsonl(tmp_path / "flat.jsonl", [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 3}
                                          for i in range(5)])
    with pytest.raises(ConfigError, match="gives every pair the score 3: a correlation needs gold scores"):
        evaluate.evaluate_sts(lambda texts: np.ones((len(texts), 3)), str(tmp_path / "flat.jsonl"))


def test_qrels_without_a_header_line_say_so(tmp_path):
    # it said "line 2: needs query-id, corpus-id and an integer score ('score')"
    files = _beir(tmp_path, [("q1", "d1", 1)])
    (tmp_path / "bare.tsv").write_text("q1\td1\t1\nq2\td2\t1\n")
    with pytest.raises(ConfigError, match=r"bare.tsv: its first line, the header, has no 'query-id' column "
                                          r"\(it reads \['q1', 'd1', '1'\]\); BEIR qrels begin with"):
        read_beir(files[0], files[1], str(tmp_path / "bare.tsv"))


@pytest.mark.parametrize("kind", ["sts", "retrieval", "classification"])
def test_the_data_is_read_before_the_model_loads(tmp_path, kind):
    """A missing data file is said at once, not after seconds of loading a model: here the model
    does not exist, and the error is still about the data."""
    missing = str(tmp_path / "missing.jsonl")
    files = {"data": missing} if kind != "retrieval" else {"corpus": missing, "queries": missing,
                                                            "qrels": missing}
    with pytest.raises(ConfigError, match=r"missing.jsonl'? does not exist"):
        evaluate.evaluate(kind, model=str(tmp_path / "no-model"), **files)


def test_query_vectors_of_another_model_and_flags_nothing_reads_are_refused(tiny_models, tmp_path, capsys):
    """Query vectors from another model (an older one of the same dim, say) were scored as if they
    matched; a flag the chosen scoring does not read was ignored without a word."""
    from semvec.compress.config import load_compress_config
    from semvec.compress.job import run as compress

    files = _beir(tmp_path, [("q1", "d1", 1), ("q2", "d2", 1)])
    corpus, queries, qrels = files
    for name, src, model in (("docs", corpus, "bert"), ("q-bert", queries, "bert"),
                             ("q-gpt", queries, "gpt")):
        run(load_embed_config(None, input=src, output=str(tmp_path / name), model=str(tiny_models[model]),
                              id_field="_id"))
    compress(load_compress_config(None, vectors=str(tmp_path / "docs"), output=str(tmp_path / "packed"),
                                  quantize="int8"))
    beir = {"corpus": corpus, "queries": queries, "qrels": qrels}
    for docs in ("docs", "packed"):
        assert evaluate.evaluate("retrieval", vectors=str(tmp_path / docs),
                                 query_vectors=str(tmp_path / "q-bert"), **beir)["queries"] == 2
        with pytest.raises(ConfigError, match=r"query vectors .*q-gpt.* have fingerprint .*: queries must be "
                                              "embedded by the same model"):
            evaluate.evaluate("retrieval", vectors=str(tmp_path / docs),
                              query_vectors=str(tmp_path / "q-gpt"), **beir)
    # the queries looked up in the documents' own output, where they are not: the error says why
    with pytest.raises(ConfigError, match="without --query-vectors the queries are looked up in --vectors"):
        evaluate.evaluate("retrieval", vectors=str(tmp_path / "docs"), **beir)
    q, docs = str(tmp_path / "q-bert"), str(tmp_path / "docs")
    ignored = [({"query_vectors": q}, "--query-vectors goes with --vectors or --index"),
               ({"model": "bundled", "vectors": docs}, "give --model or --vectors, not both"),
               ({"model": "bundled", "index": str(tmp_path / "ix"), "query_vectors": q},
                "with --query-vectors nothing is embedded")]
    for flags, says in ignored:
        with pytest.raises(ConfigError, match=says):
            evaluate.evaluate("retrieval", **flags, **beir)
    with pytest.raises(ConfigError, match="--query-vectors and --index are retrieval's"):
        evaluate.evaluate("sts", data=corpus, query_vectors=str(tmp_path / "q-bert"))
    with pytest.raises(ConfigError, match="give --model or --vectors, not both"):
        evaluate.evaluate("sts", data=corpus, model="bundled", vectors=str(tmp_path / "docs"))


def test_stored_vectors_with_titles_score_as_the_model_does(tiny_models, tmp_path):
    """`--model` embeds BEIR documents as title + " " + text, a backfill its text field alone: on a
    corpus with titles the two scored apart. --title-field joins them as BEIR does."""
    from semvec.encode import Encoder

    docs = [{"_id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate(
        [("Cats", "they sleep a lot"), ("Dogs", "they bark at night"), ("", "a page without a title"),
         ("Rivers", "water runs downhill"), ("Stars", "they shine far away")])]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "cats sleeping"},
                                                       {"_id": "q2", "text": "rivers and water"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td3\t1\n")
    beir = {"corpus": str(corpus), "queries": str(queries), "qrels": str(tmp_path / "qrels.tsv")}
    model = str(tiny_models["bert"])
    for out, src, title in (("titled", corpus, "title"), ("q", queries, None)):
        run(load_embed_config(None, input=str(src), output=str(tmp_path / out), model=model, id_field="_id",
                              title_field=title))
    stored = evaluate.load_vectors(str(tmp_path / "titled"))
    want = Encoder(tiny_models["bert"]).encode_texts(["Cats they sleep a lot", "a page without a title"])
    np.testing.assert_allclose(np.stack([stored["d0"], stored["d2"]]), want, atol=1e-5)
    by_model = evaluate.evaluate("retrieval", model=model, **beir)
    by_vectors = evaluate.evaluate("retrieval", vectors=str(tmp_path / "titled"),
                                   query_vectors=str(tmp_path / "q"), **beir)
    assert by_vectors["ndcg@10"] == pytest.approx(by_model["ndcg@10"], abs=1e-6)
    # a title field the input lacks is refused before any work
    with pytest.raises(ConfigError, match="has no field 'heading'.*name the field with --title-field"):
        run(load_embed_config(None, input=str(corpus), output=str(tmp_path / "x"), model=model,
                              title_field="heading"))
