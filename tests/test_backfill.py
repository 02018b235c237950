"""The backfill end to end on a local Ray with tiny models: formats, resume, refusal, bad rows."""

import csv
import glob
import gzip
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from semvec import precision
from semvec.backfill.job import run
from semvec.config import CPU_BATCH_ROWS, load_embed_config
from semvec.encode import Encoder
from semvec.errors import ConfigError, OutputMismatch
from semvec.testing import corpus_sentences
from tests.conftest import VECTOR_ATOL, write_jsonl


def read_output(out: Path) -> pa.Table:
    parts = sorted(glob.glob(str(out / "part-*.parquet")))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None


def read_quarantine(out: Path) -> list[dict]:
    parts = sorted(glob.glob(str(out / "_quarantine" / "part-*.parquet")))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def embed(input, output, model, **kw):
    return run(load_embed_config(None, input=str(input), output=str(output), model=str(model), **kw))


def _write(fmt: str, path: Path, texts: list[str], id_prefix: str = "") -> Path:
    rows = [{"doc": f"{id_prefix}d{i}", "body": t} for i, t in enumerate(texts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if fmt == "jsonl.gz":
        p = path.with_suffix(".jsonl.gz")
        p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return p
    if fmt in ("csv", "tsv"):
        p = path.with_suffix("." + fmt)
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, ["doc", "body"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
        return p
    if fmt == "parquet":
        p = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), p)
        return p
    if fmt == "txt":
        p = path.with_suffix(".txt")
        p.write_text("\n".join(texts) + "\n")
        return p
    raise ValueError(fmt)


FORMATS = ["jsonl", "jsonl.gz", "csv", "tsv", "parquet", "txt"]


def test_formats_embed_every_row_like_the_encoder(ray_local, tiny_models, tmp_path):
    """One backfill over a folder holding a file of each format (a backfill costs its encoder
    actor's start, whatever its rows): each file's rows, ids and vectors are checked on their own,
    by the `source` each output row carries. Each structured file has its own texts and ids, so a
    row given to the wrong file would show. A .txt file has no fields: its parser reads neither
    text_field nor id_field, and its ids are FILE:ROW as in a run without them."""
    texts = {fmt: corpus_sentences(57, seed=11 + k) for k, fmt in enumerate(FORMATS)}
    sources = {fmt: _write(fmt, tmp_path / "in" / "data", texts[fmt], id_prefix=f"{fmt}-").name
               for fmt in FORMATS}
    assert len(set(sources.values())) == len(FORMATS)
    out = tmp_path / "out"
    summary = embed(tmp_path / "in", out, tiny_models["bert"], batch_rows=8, text_field="body",
                    id_field="doc")
    assert summary["embedded"] == 57 * len(FORMATS) and summary["quarantined"] == 0
    assert summary["duplicate_ids"] == 0
    table = read_output(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert sorted(set(table["source"].to_pylist())) == sorted(sources.values())
    inputs = {i["source"]: i for i in manifest(out)["inputs"]}
    encoder = Encoder(tiny_models["bert"])
    failed = {}
    for fmt, source in sources.items():
        try:
            entry = inputs[source]
            assert (entry["rows"], entry["embedded"], entry["quarantined"]) == (57, 57, 0)
            rows = table.filter(pc.equal(table["source"], source)).sort_by("row")
            assert rows["row"].to_pylist() == list(range(57))
            want_ids = [f"{source}:{i}" for i in range(57)] if fmt == "txt" else [
                f"{fmt}-d{i}" for i in range(57)]
            assert rows["id"].to_pylist() == want_ids
            got = np.stack(rows["embedding"].to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(got, encoder.encode_texts(texts[fmt]), atol=VECTOR_ATOL)
        except AssertionError as exc:  # every format's failure at once, each under its name
            failed[fmt] = f"{source}: {exc}"
    assert not failed, "formats embedded wrongly: " + "\n\n".join(f"[{k}] {v}" for k, v in failed.items())


def test_folder_and_glob_inputs_and_manifest(ray_local, tiny_models, tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"sub{i}" / f"f{i}.jsonl",
                    [{"text": t} for t in corpus_sentences(10 + i, seed=i)])
    (tmp_path / "in" / "_SUCCESS").write_text("")  # marker files are not data
    embed(tmp_path / "in", tmp_path / "a", tiny_models["bert"])
    m = manifest(tmp_path / "a")
    assert m["status"] == "complete" and m["totals"] == {"rows": 33, "embedded": 33, "quarantined": 0}
    assert [i["rows"] for i in m["inputs"]] == [10, 11, 12]
    assert m["model"]["dim"] == 32 and m["model"]["pooling"] == "mean"
    # the default precision, as this machine's CPU decides it, and why
    dtype, why = precision.resolve("auto", "cpu")
    assert m["config"]["dtype"] == "auto"
    assert (m["model"]["dtype"], m["model"]["dtype_reason"]) == (dtype.value, why)
    assert (m["config"]["batch_rows"], m["rows_per_batch"]) == (None, CPU_BATCH_ROWS)  # the default, as run
    assert all(i["outputs"] for i in m["inputs"])
    s = embed(str(tmp_path / "in" / "sub*" / "*.jsonl"), tmp_path / "b", tiny_models["bert"], dtype="float32",
              batch_rows=16)
    assert s["embedded"] == 33
    m = manifest(tmp_path / "b")
    assert (m["model"]["dtype"], m["model"]["dtype_reason"]) == ("float32", "pinned (--dtype)")
    assert (m["config"]["batch_rows"], m["rows_per_batch"]) == (16, 16)


def test_rerun_skips_finished_work_and_refuses_another_config(ray_local, tiny_models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_sentences(30)])
    first = embed(src, tmp_path / "out", tiny_models["bert"])
    parts = sorted(glob.glob(str(tmp_path / "out" / "part-*")))
    again = embed(src, tmp_path / "out", tiny_models["bert"])
    assert again["rows_this_run"] == 0 and again["skipped_inputs"] == 1
    # nothing embedded this run: the manifest keeps the precision the vectors were embedded in
    assert manifest(tmp_path / "out")["model"]["dtype_reason"].startswith("auto: ")
    assert again["embedded"] == first["embedded"] == 30
    assert sorted(glob.glob(str(tmp_path / "out" / "part-*"))) == parts
    with pytest.raises(ConfigError, match="another model or config"):
        embed(src, tmp_path / "out", tiny_models["bert"], pooling="cls")
    with pytest.raises(ConfigError, match="another model or config"):
        embed(src, tmp_path / "out", tiny_models["gpt"])
    replaced = embed(src, tmp_path / "out", tiny_models["bert"], pooling="cls", overwrite=True)
    assert replaced["embedded"] == 30 and manifest(tmp_path / "out")["model"]["pooling"] == "cls"


def test_a_new_file_in_the_input_folder_is_embedded_on_rerun(ray_local, tiny_models, tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in corpus_sentences(5)])
    embed(tmp_path / "in", tmp_path / "out", tiny_models["bert"])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": t} for t in corpus_sentences(7)])
    s = embed(tmp_path / "in", tmp_path / "out", tiny_models["bert"])
    assert s["rows_this_run"] == 7 and s["embedded"] == 12



def test_another_input_or_a_file_gone_from_the_input_is_refused_not_mixed_in(ray_local, tiny_models,
                                                                               tmp_path):
    """An output holds one input's vectors: parts of files this run does not list would stay
    uncounted beside its own (an index would serve both corpora)."""
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in corpus_sentences(5)])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": t} for t in corpus_sentences(7)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": t} for t in corpus_sentences(3)])
    out = tmp_path / "out"
    embed(tmp_path / "in", out, tiny_models["bert"])
    parts = sorted(glob.glob(str(out / "part-*")))
    with pytest.raises(OutputMismatch, match=r"holds vectors of 2 input file\(s\) that are not in input .*"
                                             r"other\.jsonl.*e\.g\. 'a\.jsonl'.*--overwrite"):
        embed(other, out, tiny_models["bert"])
    (tmp_path / "in" / "b.jsonl").unlink()
    with pytest.raises(OutputMismatch, match=r"1 input file\(s\).*'b\.jsonl'"):
        embed(tmp_path / "in", out, tiny_models["bert"])
    assert sorted(glob.glob(str(out / "part-*"))) == parts and manifest(out)["totals"]["rows"] == 12
    replaced = embed(other, out, tiny_models["bert"], overwrite=True)
    assert replaced["embedded"] == 3 and len(read_output(out)) == 3

def test_resume_completes_partial_output_exactly_once(ray_local, tiny_models, tmp_path):
    """Parts of an interrupted run stay; the rerun embeds only the rows they lack."""
    texts = corpus_sentences(200, seed=2)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    kw = {"id_field": "id", "rows_per_file": 40, "batch_rows": 20}
    embed(src, tmp_path / "cut", tiny_models["bert"], **kw)
    # The whole output, read before the crash: what a second run of the same config would write
    full = read_output(tmp_path / "cut").sort_by("id")
    assert full.num_rows == 200
    # Simulate a crash: drop some committed parts and mark the manifest unfinished.
    parts = sorted(glob.glob(str(tmp_path / "cut" / "part-*")))
    for p in parts[1::2]:
        Path(p).unlink()
    m = manifest(tmp_path / "cut")
    m["status"] = "running"
    for i in m["inputs"]:
        i["complete"] = False
    (tmp_path / "cut" / "_manifest.json").write_text(json.dumps(m))
    s = embed(src, tmp_path / "cut", tiny_models["bert"], **kw)
    assert 0 < s["rows_this_run"] < 200
    cut = read_output(tmp_path / "cut").sort_by("id")
    assert cut["id"].to_pylist() == full["id"].to_pylist()  # each row once, none missing
    np.testing.assert_allclose(np.stack(cut["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(full["embedding"].to_numpy(zero_copy_only=False)), atol=VECTOR_ATOL)


def test_bad_rows_go_to_quarantine_with_reasons(ray_local, tiny_models, tmp_path):
    good = corpus_sentences(6)
    lines = [json.dumps({"id": f"g{i}", "text": t}).encode() for i, t in enumerate(good)]
    bad = {
        b'{"id": "m1", "text": "unterminated': "malformed_json",
        json.dumps({"id": "m2", "body": "no text field"}).encode(): "missing_text_field",
        json.dumps({"id": "m3", "text": None}).encode(): "empty_text",
        json.dumps({"id": "m4", "text": ""}).encode(): "empty_text",
        json.dumps({"id": "m5", "text": "   \t "}).encode(): "empty_text",
        json.dumps({"id": "m6", "text": 42}).encode(): "non_string_text",
        b'{"id": "m7", "text": "caf\xe9 bad byte"}': "invalid_utf8",
        json.dumps({"id": "m8", "text": "x" * 1_000_000}).encode(): "text_too_long",
        json.dumps(["a", "list"]).encode(): "not_an_object",
    }
    dup = json.dumps({"id": "g0", "text": "the same id again"}).encode()
    data = lines[:3] + list(bad) + [dup] + lines[3:]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(data) + b"\n")
    s = embed(tmp_path / "bad.jsonl", tmp_path / "out", tiny_models["bert"], id_field="id")
    assert s["rows"] == len(data)
    assert s["embedded"] + s["quarantined"] == len(data)
    assert s["embedded"] == 7 and s["quarantined"] == len(bad)
    assert s["duplicate_ids"] == 1
    q = read_quarantine(tmp_path / "out")
    assert sorted(r["reason"] for r in q) == sorted(bad.values())
    assert all(r["source"] == "bad.jsonl" and r["row"] >= 3 for r in q)
    # a row whose id could be read keeps it in quarantine, whatever is wrong with its text (m1 and
    # m7's lines do not parse, the list has no id)
    assert sorted(r["id"] for r in q if r["id"] is not None) == ["m2", "m3", "m4", "m5", "m6", "m8"]
    assert max(len(r["raw"]) for r in q) <= 1000
    m = manifest(tmp_path / "out")
    assert m["duplicates"]["examples"] == ["g0"]
    assert m["inputs"][0]["quarantine_reasons"]["empty_text"] == 3


@pytest.mark.parametrize("granularity", ["sentence", "token"])
def test_a_file_of_only_bad_rows_is_all_quarantined(ray_local, tiny_models, tmp_path, granularity):
    # every row of a batch in quarantine once crashed the tokenize stage (an empty list)
    rows = [{"id": f"b{i}", "text": " " * i} for i in range(5)]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    s = embed(tmp_path / "bad.jsonl", tmp_path / "out", tiny_models["bert"], granularity=granularity)
    assert s["rows"] == 5 and s["embedded"] == 0 and s["quarantined"] == 5
    assert {r["reason"] for r in read_quarantine(tmp_path / "out")} == {"empty_text"}
    assert manifest(tmp_path / "out")["status"] == "complete"


def test_truncated_gzip_keeps_what_was_read(ray_local, tiny_models, tmp_path):
    rows = "".join(json.dumps({"text": t}) + "\n" for t in corpus_sentences(2000, seed=4))
    blob = gzip.compress(rows.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    s = embed(tmp_path / "cut.jsonl.gz", tmp_path / "out", tiny_models["bert"])
    q = read_quarantine(tmp_path / "out")
    assert [r["reason"] for r in q] == ["unreadable_file"]
    assert s["embedded"] > 0 and s["rows"] == s["embedded"] + 1


# one way each: the token columns (lists of lists, offsets pairs) also cross Ray Data's blocks
@pytest.mark.parametrize("kind, ray_from_rows", [("bert", 20_000), ("gpt", 1)],
                         ids=["bert-without-ray", "gpt-on-ray"])
def test_token_mode_writes_token_vectors_and_offsets(ray_local, tiny_models, tmp_path, kind, ray_from_rows):
    texts = corpus_sentences(12, seed=8)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    embed(src, tmp_path / "out", tiny_models[kind], granularity="token", ray_from_rows=ray_from_rows)
    ran_on = json.loads((tmp_path / "out" / "_manifest.json").read_text())["ran_on"]
    assert ran_on == ("ray" if ray_from_rows == 1 else "driver")
    table = read_output(tmp_path / "out").sort_by("row")
    encoder = Encoder(tiny_models[kind])
    tk = encoder.tokenize(texts, with_offsets=True)
    _, token_vectors = encoder.encode_ids(tk.ids, with_tokens=True)
    for i, row in enumerate(table.to_pylist()):
        real = ~tk.special[i]
        assert len(row["tokens"]) == len(row["offsets"]) == len(row["token_embeddings"]) == real.sum()
        np.testing.assert_allclose(np.array(row["token_embeddings"]), token_vectors[i][real],
                                   atol=VECTOR_ATOL)
        for (a, b), token in zip(row["offsets"], row["tokens"], strict=True):
            assert 0 <= a < b <= len(texts[i])
            # WordPiece marks continuations with ##, byte-level BPE marks a space with Ġ
            assert token.lstrip("#Ġ").lower() in texts[i][a:b].lower()


def test_truncation_is_recorded_per_row(ray_local, tiny_models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "cat " * 300}, {"text": "a short one"}])
    embed(src, tmp_path / "out", tiny_models["bert"], max_length=32)
    table = read_output(tmp_path / "out").sort_by("row")
    assert table["truncated"].to_pylist() == [True, False]
    assert table["n_tokens"].to_pylist()[0] == 32


def test_gpu_pool_waits_for_an_autoscaler_only_when_max_workers_is_given(ray_local, tiny_models, tmp_path):
    from semvec.backfill.pipeline import _pool_size

    base = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out"),
            "model": str(tiny_models["bert"]), "num_gpus_per_worker": 1}
    # this machine has no GPU: as a cluster whose GPU workers have scaled to zero
    assert _pool_size(load_embed_config(None, **base, max_workers=4), 1.0) == (1, 4)
    assert _pool_size(load_embed_config(None, **base, max_workers=4, min_workers=2), 1.0) == (2, 4)
    with pytest.raises(ConfigError, match="give max_workers"):
        _pool_size(load_embed_config(None, **base), 1.0)


def test_ray_batches_are_bigger_for_gpu_actors_unless_set(tmp_path):
    base = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out")}
    assert load_embed_config(None, **base).rows_per_batch == 2048
    assert load_embed_config(None, **base, num_gpus_per_worker=0.5).rows_per_batch == 8192
    assert load_embed_config(None, **base, num_gpus_per_worker=1, batch_rows=100).rows_per_batch == 100
    with pytest.raises(ConfigError, match="batch_rows must be a positive integer"):
        load_embed_config(None, **base, batch_rows=0)


def test_a_small_job_runs_without_ray_only_off_a_cluster_on_cpus(tmp_path, monkeypatch):
    from semvec import cluster
    from semvec.backfill.pipeline import runs_here

    base = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out")}
    small = load_embed_config(None, **base)  # ray_from_rows 20,000
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    class Context:  # the Ray this process is connected to
        gcs_address = "127.0.0.1:1"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # none at all
    assert runs_here(small, 5)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster, "_started_here", {"127.0.0.1:1"})  # one init_ray started here
    assert runs_here(small, 19_999)
    assert not runs_here(small, 20_000)  # as many rows as ray_from_rows: on Ray
    assert not runs_here(small, None)  # rows that cannot be estimated: on Ray
    assert not runs_here(load_embed_config(None, **base, ray_from_rows=1), 5)
    assert not runs_here(load_embed_config(None, **base, num_gpus_per_worker=1), 5)  # GPUs: on Ray
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster (as under `ray job submit`)
    assert not runs_here(small, 5)
    monkeypatch.delenv("RAY_ADDRESS")
    # connected by the caller to a Ray init_ray did not start (after one it started, shut down)
    Context.gcs_address = "10.0.0.5:6379"
    assert not runs_here(small, 5)
    with pytest.raises(ConfigError, match="ray_from_rows"):
        load_embed_config(None, **base, ray_from_rows=0)


def test_an_output_among_its_input_is_refused_and_overwrite_removes_only_our_parts(tiny_models, tmp_path):
    """An output inside the input folder (or matching its glob) was embedded, then read back as
    input on the rerun; a Spark or pyarrow `part-0.parquet` counted as a semvec part, which
    --overwrite, as the refusal advised, removed."""
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", [{"text": "the first text"}, {"text": "the second"}])
    for source, output, says in ((data, data / "vectors", "lies inside the input"),
                                 (str(data / "**"), data / "vectors", "lies among the input"),
                                 (data / "a.jsonl", data, "holds the input")):
        with pytest.raises(ConfigError, match=says):
            embed(source, output, tiny_models["bert"])
    assert not (data / "vectors").exists()
    # someone else's parquet parts: not semvec's, so kept, and never read as vectors
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), out / "part-0.parquet")
    with pytest.raises(ConfigError, match="not empty and holds no semvec manifest"):
        embed(data, out, tiny_models["bert"])
    embed(data, out, tiny_models["bert"], overwrite=True)
    assert (out / "part-0.parquet").exists() and manifest(out)["totals"]["embedded"] == 2
    from semvec.evaluate.vectors import load_vectors

    assert len(load_vectors(str(out))) == 2


def test_rows_added_to_an_input_copied_with_its_mtime_kept_are_embedded(tiny_models, tmp_path):
    """A local file's version is its mtime: one copied over with its mtime kept (cp -p, rsync -a)
    was found finished, and its new rows were never embedded. Its size tells it apart too."""
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": str(i), "text": f"text number {i}"} for i in range(4)])
    embed(src, tmp_path / "out", tiny_models["bert"], id_field="id")
    stat = src.stat()
    write_jsonl(src, [{"id": str(i), "text": f"text number {i}"} for i in range(6)])
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    embed(src, tmp_path / "out", tiny_models["bert"], id_field="id")
    assert manifest(tmp_path / "out")["totals"]["embedded"] == 6
    assert sorted(read_output(tmp_path / "out")["id"].to_pylist()) == [str(i) for i in range(6)]


def test_a_part_cut_short_in_its_local_write_is_still_ours(tmp_path):
    """A crash inside a part's write leaves `part-....parquet.tmp-<uuid>`: semvec's, so the output
    is still a backfill cut short (which --overwrite clears), not someone else's folder."""
    from semvec.backfill.manifest import OutputDir

    mark = f".tmp-{uuid.uuid4().hex}"  # as storage.write_atomic names its temporaries
    (tmp_path / f"part-0123456789ab-000000000000-000000000009.parquet{mark}").write_bytes(b"x")
    assert not OutputDir(str(tmp_path)).has_foreign_files()
    (tmp_path / f"part-0.parquet{mark}").write_bytes(b"x")  # a temporary of another's file
    assert OutputDir(str(tmp_path)).has_foreign_files()
