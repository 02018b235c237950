"""Search: FAISS indexes built from real backfill outputs (local, on Ray, on the S3 server), queried
through the API, the CLI and `evaluate retrieval --index`; another model refused; one-line errors;
a crash after every write of a build and of a batch search, each followed by a rerun."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semvec import storage
from semvec.errors import ConfigError, OutputMismatch
from semvec.evaluate.vectors import load_vectors
from semvec.search import open as open_index
from semvec.search.build import build, default_nlist
from semvec.search.config import IndexConfig, load_index_config
from semvec.search.store import IndexDir, files_of
from tests.conftest import REPO, cli, write_jsonl
from tests.test_exactly_once import crash_env, run_at_most


def index(vectors: str, out, **settings) -> dict:
    return build(load_index_config(None, vectors=vectors, index=str(out), **settings))


def error_line(err: str) -> str:
    """semvec's one error line, the last; lines a Ray worker forwarded to this process's stderr
    (the tests' Ray is this process's) may come before it, no traceback."""
    ours = [line for line in err.splitlines() if line.startswith("semvec:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0] and "Traceback" not in err, err
    return ours[0]


def exact_top(beir: dict, k: int) -> list[list[str]]:
    """The k nearest documents of each query by brute-force cosine, for comparison."""
    docs, queries = load_vectors(beir["docs"]), load_vectors(beir["queries"])
    ids = list(docs)
    d = np.stack([docs[i] for i in ids])
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = np.stack(list(queries.values()))
    order = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


@pytest.mark.parametrize("kind, settings", [("exact", {}), ("hnsw", {}), ("ivf", {"nlist": 4}),
                                            ("ivf-on-ray", {"nlist": 4, "ray_from_rows": 1})])
def test_each_kind_finds_what_exact_search_finds(beir, tmp_path, kind, settings):
    summary = index(beir["docs"], tmp_path / "ix", kind=kind.split("-")[0], **settings)
    assert summary["rows"] == beir["n_docs"] and summary["built"]
    opened = open_index(str(tmp_path / "ix"))
    queries = load_vectors(beir["queries"])
    hits = opened.search_vectors(np.stack(list(queries.values())), 5,
                                 nprobe=4 if "ivf" in kind else None)
    want = exact_top(beir, 5)
    # exact, hnsw at this size and ivf probing every list rank as brute force does
    assert [h.ids for h in hits] == want
    assert all(h.scores == sorted(h.scores, reverse=True) for h in hits)
    record = json.loads((tmp_path / "ix" / "_index.json").read_text())
    assert record["built_on"] == ("ray" if "ray" in kind else "driver")
    source = json.loads((Path(beir["docs"]) / "_manifest.json").read_text())
    assert record["model"]["fingerprint"] == source["model"]["fingerprint"]
    assert record["model"]["trust_remote_code"] is source["config"]["trust_remote_code"] is False
    assert record["model"]["dtype"] == source["model"]["dtype"]  # the queries' precision follows it
    assert record["source"]["config_hash"] == source["config_hash"]


def test_queries_take_the_precision_of_the_indexed_vectors_when_it_is_outside_the_bar():
    from semvec.config import DType
    from semvec.search.index import query_dtype

    # within cosine 0.9999 of float32 all three give the same vectors: the fastest here
    assert [query_dtype(d) for d in ("float32", "bfloat16-mixed", "auto", None)] == [DType.AUTO] * 4
    assert query_dtype("bfloat16") == DType.BFLOAT16 and query_dtype("float16") == DType.FLOAT16


def test_queries_are_embedded_by_the_index_model_and_another_model_is_refused(beir, tiny_models,
                                                                              tmp_path, capsys):
    index(beir["docs"], tmp_path / "ix")
    opened = open_index(str(tmp_path / "ix"))
    texts = [json.loads(line)["text"] for line in (beir["root"] / "corpus.jsonl").read_text().splitlines()]
    # a document's own text finds the document first
    assert [h.ids[0] for h in opened.search(texts[:20], k=3)] == [f"d{i}" for i in range(20)]
    # the model found at another path is the same model: accepted
    assert opened.search(texts[0], k=1, model=str(tiny_models["bert"]))[0].ids == ["d0"]
    with pytest.raises(ConfigError, match="must be embedded by the same model"):
        opened.search(texts[0], model=str(tiny_models["gpt"]))
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", texts[3], "--model",
                         str(tiny_models["gpt"]))
    assert code == 2 and "same model" in error_line(err)
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", texts[3], "-k", "2")
    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["ids"][0] == "d3" and len(answer["scores"]) == 2 and answer["query"] == texts[3]


def test_evaluate_retrieval_on_an_index_equals_exact_search(beir, tiny_models, tmp_path, capsys):
    base = ["evaluate", "retrieval", *beir["files"], "--json"]
    code, out, err = cli(capsys, *base, "--vectors", beir["docs"], "--query-vectors", beir["queries"])
    assert code == 0, err
    exact = json.loads(out.strip().splitlines()[-1])
    index(beir["docs"], tmp_path / "ix", kind="hnsw")
    code, out, err = cli(capsys, *base, "--index", str(tmp_path / "ix"), "--query-vectors", beir["queries"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == exact
    # queries embedded by the index's model score as the stored query vectors do
    code, out, err = cli(capsys, *base, "--index", str(tmp_path / "ix"))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-6)

    # query vectors of another model are refused by fingerprint, in one line
    other = tmp_path / "other-queries"
    from semvec.backfill.job import run as backfill
    from semvec.config import load_embed_config

    backfill(load_embed_config(None, input=str(beir["root"] / "queries.jsonl"), output=str(other),
                               model=str(tiny_models["gpt"]), id_field="_id"))
    code, out, err = cli(capsys, *base, "--index", str(tmp_path / "ix"), "--query-vectors", str(other))
    assert code == 2 and "same model" in error_line(err)


@pytest.mark.slow
def test_an_index_built_from_and_to_the_s3_server_is_queried_there(beir, s3_env, tmp_path, capsys):
    fs = storage.filesystem("s3://bucket")
    prefix = f"bucket/search-{tmp_path.name}"
    fs.put(beir["docs"].rstrip("/") + "/", f"{prefix}/docs", recursive=True)
    src, ix = f"s3://{prefix}/docs", f"s3://{prefix}/ix"
    # built on the tests' Ray, whose workers hold the server's credentials as a cluster's would
    code, out, err = cli(capsys, "index", src, ix, "--kind", "ivf", "--nlist", "3", "--ray-from-rows", "1",
                         "--json")
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    assert (summary["rows"], summary["kind"], summary["built"]) == (beir["n_docs"], "ivf", True)
    assert s3_env["secret"] not in out + err
    record = json.loads(fs.cat(f"{prefix}/ix/_index.json"))
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/ix")) == \
        sorted(["_index.json", *record["files"]])  # the lease is gone with its holder
    assert record["source"]["uri"] == src and s3_env["secret"] not in json.dumps(record)

    # queried from the store, by the API and by a batch search writing back to the store
    queries = load_vectors(beir["queries"])
    hits = open_index(ix).search_vectors(np.stack(list(queries.values())), 5, nprobe=3)
    assert [h.ids for h in hits] == exact_top(beir, 5)
    fs.put(str(beir["root"] / "queries.jsonl"), f"{prefix}/queries.jsonl")
    code, out, err = cli(capsys, "search", ix, "--queries", f"s3://{prefix}/queries.jsonl", "--id-field",
                         "_id", "--output", f"s3://{prefix}/answers.jsonl", "--nprobe", "3", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in fs.cat(f"{prefix}/answers.jsonl").decode().splitlines()]
    assert [line["query_id"] for line in lines] == list(queries)
    # a rebuild of the same settings finds the index built; other settings are refused
    assert index(src, ix, kind="ivf", nlist=3)["built"] is False
    with pytest.raises(OutputMismatch, match="other settings or from other vectors"):
        index(src, ix, kind="hnsw")


def test_a_batch_search_answers_every_row_and_marks_the_bad_ones(beir, tmp_path, capsys):
    index(beir["docs"], tmp_path / "ix")
    texts = [json.loads(line)["text"] for line in (beir["root"] / "corpus.jsonl").read_text().splitlines()]
    src = tmp_path / "queries.jsonl"
    src.write_text("\n".join([json.dumps({"qid": "a", "text": texts[5]}), '{"qid": "b", "text": "cut',
                              json.dumps({"qid": "c", "text": "   "}),
                              json.dumps({"qid": "d", "text": texts[7]})]) + "\n")
    out = tmp_path / "answers.jsonl"
    code, stdout, err = cli(capsys, "search", str(tmp_path / "ix"), "--queries", str(src), "--id-field",
                            "qid", "--output", str(out), "-k", "3")
    assert code == 0, err
    assert "2 of 4 queries answered (2 rows with an error line)" in stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("error") for line in lines] == [None, "malformed_json", "empty_text", None]
    assert lines[0]["query_id"] == "a" and lines[0]["ids"][0] == "d5" and len(lines[0]["ids"]) == 3
    assert lines[1]["query_id"] == "queries.jsonl:1" and lines[1]["row"] == 1
    assert lines[3]["ids"][0] == "d7"


def test_bad_input_is_one_line_and_exit_2_before_any_work(beir, tmp_path, capsys):
    write_jsonl(tmp_path / "q.jsonl", [{"text": "x"}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "qs").mkdir()
    (tmp_path / "qlink").symlink_to(tmp_path / "qs")
    (tmp_path / "deep" / "qs").mkdir(parents=True)
    (tmp_path / "deep" / "sub").mkdir()
    (tmp_path / "sublink").symlink_to(tmp_path / "deep" / "sub")  # its ".." is deep, not tmp_path
    cases = [
        (["index", beir["docs"], str(tmp_path / "a"), "--kind", "annoy"], "unknown kind 'annoy'"),
        (["index", beir["docs"], str(tmp_path / "a"), "--kind", "ivf", "--nlist", "1000"],
         "nlist 1000 needs at least 1000 vectors"),
        (["index", beir["docs"], beir["docs"] + "/ix"], "lies inside the vectors' prefix"),
        (["index", str(tmp_path / "empty"), str(tmp_path / "a")], "not a backfill output"),
        (["search", str(tmp_path / "nothing"), "--query", "x"], "no index at"),
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "q.jsonl")], "needs --output"),
        (["search", str(tmp_path / "nothing"), "--query", "x", "-k", "0"], "-k must be an integer >= 1"),
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "q.jsonl"), "--output",
          str(tmp_path / "q.jsonl")], "is the queries file"),
        # among the queries (a rerun would read the answers as queries), a folder, or --query's
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path), "--output",
          str(tmp_path / "answers.jsonl")], "lies among the queries"),
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "*.jsonl"), "--output",
          str(tmp_path / "answers.jsonl")], "lies among the queries"),
        # the same place spelled another way: through a link, or through a link and `..`
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "qs"), "--output",
          str(tmp_path / "qlink" / "answers.jsonl")], "lies among the queries"),
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "deep" / "qs"), "--output",
          str(tmp_path / "sublink" / ".." / "qs" / "answers.jsonl")], "lies among the queries"),
        # beside the glob's files, not among them: writable, so the refusal is the missing index
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "*.jsonl"), "--output",
          str(tmp_path / "out" / "answers.jsonl")], "no index at"),
        (["search", str(tmp_path / "nothing"), "--queries", str(tmp_path / "q.jsonl"), "--output",
          str(tmp_path / "empty")], "is a directory; give a file name"),
        (["search", str(tmp_path / "nothing"), "--query", "x", "--id-field", "qid"],
         "--text-field and --id-field read a --queries file"),
    ]
    for argv, says in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2 and says in error_line(err), (argv, err)
    assert not (tmp_path / "a").exists()
    # a file changed under its record is refused when the index is opened
    index(beir["docs"], tmp_path / "ix")
    ids = tmp_path / "ix" / files_of(json.loads((tmp_path / "ix" / "_index.json").read_text()))["ids"]
    ids.write_bytes(ids.read_bytes()[:-10])
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", "x")
    assert code == 2 and "not the file its _index.json describes" in err
    # the rebuild it asks for: the same settings find the files damaged and build again
    assert index(beir["docs"], tmp_path / "ix")["built"] is True
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", "x", "--nprobe", "0")
    assert code == 2 and "nprobe (--nprobe) must be an integer >= 1" in error_line(err)
    # tuning another kind's search, or an empty query, was answered as if nothing were wrong
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", "x", "--nprobe", "5")
    assert code == 2 and "nprobe tunes ivf indexes; the index at" in error_line(err) and "is exact" in err
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--query", "x", "--query", "  ")
    assert code == 2 and "query 2 of 2 is empty" in error_line(err) and not out
    # a file of queries is refused the same before it is read: nothing written, even with no good row
    write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}])
    code, out, err = cli(capsys, "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "bad.jsonl"),
                         "--output", str(tmp_path / "answers.jsonl"), "--ef-search", "8")
    assert code == 2 and "(--ef-search) tunes hnsw indexes" in error_line(err)
    assert not (tmp_path / "answers.jsonl").exists()
    with pytest.raises(ConfigError, match="hnsw_m must be an integer >= 2"):
        IndexConfig("a", "b", hnsw_m=1)


def test_search_defaults_change_the_record_only_and_overwrite_rebuilds(beir, tmp_path):
    assert index(beir["docs"], tmp_path / "ix", kind="hnsw")["built"]
    again = index(beir["docs"], tmp_path / "ix", kind="hnsw", ef_search=32)
    assert again["built"] is False and again["params"]["ef_search"] == 32
    assert open_index(str(tmp_path / "ix")).record["params"]["ef_search"] == 32
    # a setting of another kind was ignored; it is refused, as `semvec search` refuses it
    for kind, setting, says in (("hnsw", {"seed": 7}, "seed (--seed) tunes ivf indexes; this index is hnsw"),
                                ("exact", {"nprobe": 8}, "nprobe (--nprobe) tunes ivf"),
                                ("ivf", {"hnsw_m": 16}, "hnsw_m (--hnsw-m) tunes hnsw"),
                                ("exact", {"ef_search": 64}, "ef_search (--ef-search) tunes hnsw")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            index(beir["docs"], tmp_path / "ix", kind=kind, **setting)
    assert index(beir["docs"], tmp_path / "ix", kind="hnsw", overwrite=True)["built"] is True


def test_evaluate_on_an_index_of_other_ids_is_refused(beir, tiny_models, tmp_path, capsys):
    """An index whose ids are not the corpus's (embedded without --id-field _id) would score 0."""
    from semvec.backfill.job import run as backfill
    from semvec.config import load_embed_config

    backfill(load_embed_config(None, input=str(beir["root"] / "corpus.jsonl"), output=str(tmp_path / "v"),
                               model=str(tiny_models["bert"])))
    index(str(tmp_path / "v"), tmp_path / "ix")
    code, out, err = cli(capsys, "evaluate", "retrieval", *beir["files"], "--index", str(tmp_path / "ix"))
    assert code == 2 and "150 corpus ids are not in the index" in error_line(err)


def test_the_default_number_of_lists_keeps_39_training_vectors_a_list():
    assert default_nlist(1_000_000, 100_000) == 2564  # 100,000 / 39 caps 4 sqrt(n) = 4,000
    assert default_nlist(10_000, 100_000) == 256  # 10,000 / 39
    assert default_nlist(100, 100_000) == 2
    assert default_nlist(10, 100_000) == 1


@pytest.mark.slow
def test_crash_after_every_write_of_a_build_and_a_batch_search_then_rerun(beir, tmp_path):
    def snapshot(ix: Path) -> dict:
        record = json.loads((ix / "_index.json").read_text())
        opened = open_index(str(ix))
        hits = opened.search_vectors(np.stack(list(load_vectors(beir["queries"]).values())), 5)
        return {"ids": opened.ids, "hits": [h.ids for h in hits], "files": record["files"],
                "index_hash": record["index_hash"],
                "names": sorted(p.name for p in ix.iterdir() if p.name != "answers.jsonl")}

    settings = {"kind": "ivf", "nlist": 4}
    index(beir["docs"], tmp_path / "ref", **settings)
    want = snapshot(tmp_path / "ref")
    queries = beir["root"] / "queries.jsonl"
    writes = 1 + 3 + 1  # the build's lease, the index file, the ids file, _index.json; the answers
    crashes = {n: tmp_path / f"crash{n}" for n in range(1, writes + 2)}  # writes + 1: never fires

    def start(n: int, ix: Path) -> subprocess.Popen:
        # the build, then a batch search of the index it built
        script = ("import sys; from semvec.cli import main; "
                  f"sys.exit(main(['index', {beir['docs']!r}, {str(ix)!r}, '--kind', 'ivf', '--nlist', '4']) "
                  f"or main(['search', {str(ix)!r}, '--queries', {str(queries)!r}, '--id-field', '_id', "
                  f"'--output', {str(ix / 'answers.jsonl')!r}, '--nprobe', '4']))")
        return subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                                env={**os.environ, "SEMVEC_CRASH_AT": str(n)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    codes = run_at_most(3, {n: (lambda n=n, ix=ix: start(n, ix)) for n, ix in crashes.items()})
    answers = (crashes[writes + 1] / "answers.jsonl").read_text()
    assert codes[writes + 1][0] == 0, codes[writes + 1][1][-1500:]
    assert [json.loads(line)["query_id"] for line in answers.splitlines()] == \
        list(load_vectors(beir["queries"]))
    for n, ix in list(crashes.items())[:-1]:
        assert codes[n][0] == -9, f"crash at write {n} did not happen: {codes[n][1][-1500:]}"
        assert (ix / "_index.json").exists() == (n >= 4)  # the record comes last
        assert (ix / "answers.jsonl").exists() == (n == writes)  # written whole, or not at all
        if n < 4:
            index(beir["docs"], ix, **settings)
        assert snapshot(ix) == want, n
    assert (crashes[writes] / "answers.jsonl").read_text() == answers


def test_an_overwrite_answers_readers_until_its_record_and_a_cut_one_reruns(beir, tmp_path):
    """--overwrite writes the new files beside the old index, which answers every reader until the
    new record replaces its own; then the files no record names go. Killed after each of those
    writes, a reader opens the old index or the new one, whole, and the rerun leaves what an uncut
    rebuild leaves. Killed before the renames of those writes (SEMVEC_CRASH_TORN), the old index
    answers and the rerun removes the temporaries."""
    reference = tmp_path / "reference"
    index(beir["docs"], reference, kind="exact")
    want = json.loads((reference / "_index.json").read_text())
    queries = np.stack(list(load_vectors(beir["queries"]).values()))
    # lease, index file, ids file (the old one's name: the same ids), record, the old index file removed
    writes = 5
    crashes = {(n, torn): tmp_path / f"cut{n}{'-torn' if torn else ''}"
               for n in range(2, writes + 1) for torn in (False, True) if not (torn and n == 5)}

    def start(n: int, torn: bool, ix: Path) -> subprocess.Popen:
        script = ("from semvec.cli import main; "
                  f"main(['index', {beir['docs']!r}, {str(ix)!r}, '--kind', 'exact', '--overwrite'])")
        return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **crash_env(n, torn)}, start_new_session=True)

    for ix in crashes.values():
        index(beir["docs"], ix, kind="ivf", nlist=2)
        old_hits = [h.ids for h in open_index(str(ix)).search_vectors(queries, 5)]
    codes = run_at_most(3, {key: (lambda key=key, ix=ix: start(*key, ix)) for key, ix in crashes.items()})
    for (n, torn), ix in crashes.items():
        assert codes[n, torn][0] == -9, f"no crash at write {n}: {codes[n, torn][1][-1500:]}"
        assert not torn or any(".tmp-" in p.name for p in ix.iterdir()), n  # left, as a crash leaves it
        opened = open_index(str(ix))
        if n < 4 or torn:  # before the new record: the old index answers, as it did
            assert opened.kind == "ivf" and [h.ids for h in opened.search_vectors(queries, 5)] == old_hits
            assert index(beir["docs"], ix, kind="exact", overwrite=True)["built"] is True
        else:  # the new record is there: the new index answers; the rerun only removes what is left
            assert opened.record["index_hash"] == want["index_hash"]
            assert index(beir["docs"], ix, kind="exact")["built"] is False
        got = json.loads((ix / "_index.json").read_text())
        assert (got["index_hash"], got["files"]) == (want["index_hash"], want["files"]), n
        assert sorted(p.name for p in ix.iterdir()) == sorted(p.name for p in reference.iterdir()), n
        assert open_index(str(ix)).ids == open_index(str(reference)).ids


def test_a_reader_whose_files_went_with_a_rebuild_reads_the_new_record(beir, tmp_path):
    ix = tmp_path / "ix"
    index(beir["docs"], ix, kind="ivf", nlist=2)
    before = json.loads((ix / "_index.json").read_text())

    class LateReader(IndexDir):
        """A reader that read the record just before a rebuild replaced it and removed its files."""
        reads = 0

        def read_record(self):
            self.reads += 1
            return before if self.reads == 1 else super().read_record()

    index(beir["docs"], ix, kind="exact", overwrite=True)
    assert not (ix / files_of(before)["index"]).exists()  # the ids, the same, kept their file
    record, _, ids = LateReader(str(ix)).read()
    assert record["kind"] == "exact" and len(ids) == beir["n_docs"]
    # a file gone under a record that stays is refused in one line
    (ix / files_of(record)["index"]).unlink()
    with pytest.raises(ConfigError, match=r"lacks index-[0-9a-f]{16}\.faiss: rebuild it"):
        open_index(str(ix))


def test_an_index_built_before_files_were_named_by_content_still_opens(beir, tmp_path):
    ix = tmp_path / "ix"
    index(beir["docs"], ix, kind="exact")
    record = json.loads((ix / "_index.json").read_text())
    legacy = {}
    for role, name in files_of(record).items():
        old = {"index": "index.faiss", "ids": "ids.parquet"}[role]
        (ix / name).rename(ix / old)
        legacy[old] = {k: v for k, v in record["files"][name].items() if k != "role"}
    # and named its vectors without their inputs' versions
    from semvec.compress.source import open_source

    config = load_index_config(None, vectors=beir["docs"], index=str(ix))
    older = config.index_hash(open_source(beir["docs"]).identity(inputs=False))
    (ix / "_index.json").write_text(json.dumps({**record, "files": legacy, "index_hash": older}))
    assert len(open_index(str(ix)).ids) == beir["n_docs"]
    with pytest.raises(OutputMismatch, match="built from these vectors by an earlier semvec, before an "
                                             "index named its inputs' versions: pass --overwrite once"):
        index(beir["docs"], ix)
    # a rebuild of other settings replaces it and removes the old names
    index(beir["docs"], ix, kind="hnsw", overwrite=True)
    assert not (ix / "index.faiss").exists() and not (ix / "ids.parquet").exists()
    assert open_index(str(ix)).kind == "hnsw"


def test_ivf_searches_one_list_in_20_by_default():
    from semvec.search.build import default_nprobe

    # 1,264 lists: the 100,000 real vectors of benchmarks/index.py, recall@10 0.91 at 64, 0.76 at 16
    assert [default_nprobe(n) for n in (8, 100, 1264, 2564)] == [8, 16, 64, 129]


def test_repeated_ids_are_counted_and_said_at_build(tiny_models, tmp_path, caplog):
    # the backfill's manifest counts them; the index said nothing, and a search answered
    # ["card_arrival", "card_arrival", ...]
    from semvec.backfill.job import run as backfill
    from semvec.config import load_embed_config

    rows = [{"id": i, "text": t} for i, t in zip(["a", "b", "a", "c", "a", "b"],
                                                 ["my card has not arrived", "how do I top up",
                                                  "the card is still not here", "change my PIN",
                                                  "where is my new card", "top up by bank transfer"],
                                                 strict=True)]
    write_jsonl(tmp_path / "q.jsonl", rows)
    backfill(load_embed_config(None, input=str(tmp_path / "q.jsonl"), output=str(tmp_path / "v"),
                               model=str(tiny_models["bert"]), id_field="id"))
    logger = logging.getLogger("semvec.search")  # semvec's own handler may not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="semvec.search"):
            summary = index(str(tmp_path / "v"), tmp_path / "ix")
    finally:
        logger.removeHandler(caplog.handler)
    assert summary["duplicate_ids"] == 3 and summary["rows"] == 6
    assert "3 vectors of" in caplog.text and "repeat an id another vector has (e.g. 'a')" in caplog.text
    assert json.loads((tmp_path / "ix" / "_index.json").read_text())["duplicate_ids"] == 3
    assert index(str(tmp_path / "v"), tmp_path / "ix")["duplicate_ids"] == 3  # found built: the same


def test_vectors_re_embedded_from_an_edited_input_are_not_found_built(tiny_models, tmp_path):
    """An input edited in place keeps its row count, so the backfill's re-embedded parts keep their
    names and rows; the index and the compressed output said "already built" and went on serving the
    old vectors. The inputs' versions are part of what they were made from now."""
    from semvec.backfill.job import run as backfill
    from semvec.compress.config import load_compress_config
    from semvec.compress.job import run as compress
    from semvec.compress.source import open_source
    from semvec.config import load_embed_config

    src = tmp_path / "q.jsonl"
    texts = ["my card has not arrived", "how do I top up", "change my PIN", "where is my new card",
             "top up by bank transfer", "the exchange rate was wrong", "I lost my phone", "close my account"]
    write_jsonl(src, [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    embed = load_embed_config(None, input=str(src), output=str(tmp_path / "v"),
                              model=str(tiny_models["bert"]), id_field="id")
    backfill(embed)
    index(str(tmp_path / "v"), tmp_path / "ix")
    pack = {"vectors": str(tmp_path / "v"), "output": str(tmp_path / "c"), "quantize": "int8"}
    compress(load_compress_config(None, **pack))
    # made by an earlier semvec, whose hash named no input versions: said so
    manifest_path = tmp_path / "c" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    config = load_compress_config(None, **pack)
    older = config.output_hash(open_source(str(tmp_path / "v")).identity(inputs=False))
    manifest_path.write_text(json.dumps({**manifest, "config_hash": older}))
    with pytest.raises(OutputMismatch, match="compressed from these vectors by an earlier semvec"):
        compress(config)
    manifest_path.write_text(json.dumps(manifest))
    before = open_index(str(tmp_path / "ix")).search_vectors(np.ones((1, 32), np.float32), 8)[0]

    write_jsonl(src, [{"id": str(i), "text": t} for i, t in enumerate(reversed(texts))])
    os.utime(src, (os.stat(src).st_atime, os.stat(src).st_mtime + 10))
    backfill(embed)  # the changed input's stale parts are replaced: same names, same rows
    with pytest.raises(OutputMismatch, match="other settings or from other vectors"):
        index(str(tmp_path / "v"), tmp_path / "ix")
    with pytest.raises(OutputMismatch, match="other settings or from other"):
        compress(load_compress_config(None, **pack))
    assert index(str(tmp_path / "v"), tmp_path / "ix", overwrite=True)["built"] is True
    after = open_index(str(tmp_path / "ix")).search_vectors(np.ones((1, 32), np.float32), 8)[0]
    assert sorted(after.ids) == sorted(before.ids) and after.ids != before.ids
    assert compress(load_compress_config(None, **pack, overwrite=True))["vectors"] == 8
