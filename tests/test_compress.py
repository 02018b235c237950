"""Vector compression: the codec's maths on seeded data, the job on real backfill outputs (local and
on the S3 server), retrieval over compressed vectors beside float, one-line errors, and a crash
after every write of the job followed by a rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semvec import storage
from semvec.backfill.job import run as backfill
from semvec.cli import main
from semvec.compress import codec as C
from semvec.compress.config import CompressConfig, Quantize, load_compress_config
from semvec.compress.job import run
from semvec.compress.output import codec_from_dict, codec_to_dict
from semvec.compress.search import CompressedVectors
from semvec.compress.source import sample_plan
from semvec.config import load_embed_config
from semvec.errors import ConfigError, OutputMismatch
from tests.conftest import REPO, cli
from tests.test_exactly_once import crash_env, run_at_most

DIM = 32  # the tiny models' hidden size


def low_rank(n: int, dim: int, rank: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # [rank, dim], orthonormal rows
    return (rng.normal(size=(n, rank)) * np.linspace(3, 1, rank)) @ basis \
        + 0.2 + noise * rng.normal(size=(n, dim))


# ---------------------------------------------------------------- the codec


def test_pca_keeps_a_low_rank_sample_and_at_full_dim_ranks_exactly_as_cosine():
    # rank 6 about an offset, scaled to unit length: the rows lie in 7 dimensions (6 + the offset)
    x = C.unit(low_rank(2000, DIM, rank=6, noise=1e-3, seed=1))
    mean, components, explained = C.fit_pca(x, 7)
    np.testing.assert_allclose(components @ components.T, np.eye(7), atol=1e-5)
    rebuilt = mean + ((x - mean) @ components.T) @ components
    assert np.abs(rebuilt - x).max() < 0.01 and explained > 0.99
    assert np.array_equal(C.fit_pca(x, 7)[1], components)  # signs fixed: two fits, one answer

    full = C.fit(x, DIM, Quantize.NONE)
    q = C.unit(np.random.default_rng(2).normal(size=(20, DIM)))
    # (C q) . y equals q . d less the same q . mean for every document of one query
    got = full.query(q) @ full.project(x).T
    np.testing.assert_allclose(got, q @ x.T - (q @ full.mean)[:, None], atol=1e-5)


def test_int8_error_is_half_a_step_inside_the_range_and_values_beyond_are_clipped():
    y = np.random.default_rng(3).normal(size=(20_000, 8)).astype(np.float32) * np.arange(1, 9)
    scale, offset = C.calibrate_int8(y)
    low, high = offset - 128 * scale, offset + 127 * scale
    np.testing.assert_allclose(low, np.percentile(y, C.LOW_PERCENTILE, axis=0), rtol=1e-5)
    np.testing.assert_allclose(high, np.percentile(y, C.HIGH_PERCENTILE, axis=0), rtol=1e-5)
    codes = C.quantize_int8(y, scale, offset)
    assert codes.dtype == np.int8 and codes.min() == -128 and codes.max() == 127
    error = np.abs(C.dequantize_int8(codes, scale, offset) - y)
    inside = (y >= low) & (y <= high)
    assert inside.mean() > 0.999
    half_step = np.broadcast_to(scale / 2, y.shape)
    assert (error[inside] <= half_step[inside] + 1e-5).all()
    outside = C.dequantize_int8(C.quantize_int8(high + 5 * scale, scale, offset), scale, offset)
    np.testing.assert_allclose(outside, high, rtol=1e-6)


def test_binary_bits_are_the_signs_packed_first_dimension_highest_with_zero_padding():
    y = np.random.default_rng(4).normal(size=(50, 13)).astype(np.float32)
    thresholds = np.median(y, axis=0)
    bits = C.binarize(y, thresholds)
    assert bits.shape == (50, 2) and bits.dtype == np.uint8
    unpacked = np.unpackbits(bits, axis=1)
    assert np.array_equal(unpacked[:, :13], y > thresholds) and not unpacked[:, 13:].any()
    assert bits[0, 0] >> 7 == int(y[0, 0] > thresholds[0])
    h = C.hamming(bits[:5], bits)
    assert np.array_equal(h, (unpacked[:5, None, :] != unpacked[None, :, :]).sum(axis=2))


@pytest.mark.parametrize("quantize", list(Quantize))
def test_a_saved_codec_maps_queries_and_encodes_exactly_as_the_fitted_one(quantize):
    x = low_rank(3000, DIM, rank=10, noise=0.05, seed=5)
    fitted = C.fit(x, 12, quantize)
    loaded = codec_from_dict(json.loads(json.dumps(codec_to_dict(fitted))))
    q = np.random.default_rng(6).normal(size=(7, DIM))
    assert np.array_equal(loaded.query(q), fitted.query(q))
    np.testing.assert_allclose(fitted.query(q), C.unit(q) @ fitted.components.T, atol=1e-6)
    a, b = fitted.encode(x), loaded.encode(x)
    for name in ("vectors", "codes", "bits"):
        assert (getattr(a, name) is None) == (getattr(b, name) is None)
        assert getattr(a, name) is None or np.array_equal(getattr(a, name), getattr(b, name))
    assert (a.bits is not None) == (quantize == Quantize.BINARY)
    assert C.bytes_per_vector(DIM, 12, quantize) == {
        Quantize.NONE: {"source": 128, "search": 48, "stored": 48},
        Quantize.INT8: {"source": 128, "search": 12, "stored": 12},
        Quantize.BINARY: {"source": 128, "search": 2, "stored": 14}}[quantize]


def test_the_sample_is_seeded_uniform_over_parts_and_without_replacement():
    rows = [100, 0, 250, 7, 643]
    plan = sample_plan(rows, 300, seed=9)
    assert [len(p) for p in plan] == [len(p) for p in sample_plan(rows, 300, seed=9)]
    assert all(np.array_equal(a, b) for a, b in zip(plan, sample_plan(rows, 300, seed=9), strict=True))
    assert sum(len(p) for p in plan) == 300 and len(plan[1]) == 0
    for part, n in zip(plan, rows, strict=True):
        assert len(set(part.tolist())) == len(part) and (part < n).all() and (part >= 0).all()
    share = np.array([len(p) for p in plan]) / 300
    np.testing.assert_allclose(share, np.array(rows) / sum(rows), atol=0.06)
    assert [len(p) for p in sample_plan(rows, 10_000, seed=9)] == rows  # all of them, when fewer


def test_search_over_compressed_vectors_finds_what_float_search_finds():
    docs = low_rank(1500, DIM, rank=12, noise=0.1, seed=7)
    queries = docs[:100] + 0.1 * np.random.default_rng(8).normal(size=(100, DIM))
    exact = np.argsort(-(C.unit(queries) @ C.unit(docs).T), axis=1, kind="stable")[:, :10]
    ids = [f"d{i}" for i in range(len(docs))]

    def top(pca, quantize, k=10):
        codec = C.fit(docs, pca, quantize)
        return CompressedVectors("mem", ids, codec, codec.encode(docs)).search(queries, k)

    assert np.array_equal(top(DIM, Quantize.NONE), exact)  # a rotation: the same ranking
    for quantize, least in ((Quantize.INT8, 0.9), (Quantize.BINARY, 0.6)):
        got = top(None, quantize)
        overlap = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact, strict=True)])
        assert overlap >= least, (quantize, overlap)
        assert (got[:, 0] == np.arange(100)).mean() > 0.9  # each query's own document first
    # binary: the first pass shortlists by Hamming distance; with one candidate nothing is rescored
    codec = C.fit(docs, None, Quantize.BINARY)
    stored = codec.encode(docs)
    first = CompressedVectors("mem", ids, codec, stored).search(queries, 1, candidates=1)
    distances = C.hamming(C.binarize(codec.project(queries), codec.thresholds), stored.bits)
    assert np.array_equal(first[:, 0], np.argmin(distances, axis=1))


# ---------------------------------------------------------------- real backfill outputs


def compress(source: str, output, **settings) -> dict:
    return run(load_compress_config(None, vectors=source, output=str(output), **settings))


def retrieval(capsys, beir: dict, vectors: str, *extra: str) -> dict:
    capsys.readouterr()
    code = main(["evaluate", "retrieval", *beir["files"], "--vectors", vectors, *extra, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_retrieval_reads_compressed_vectors_beside_float(beir, tmp_path, capsys):
    float_ = retrieval(capsys, beir, beir["docs"], "--query-vectors", beir["queries"])
    assert float_["docs"] == beir["n_docs"] and float_["ndcg@10"] > 0.5
    got = {}
    for name, settings in {"rotation": {"pca": DIM}, "pca16": {"pca": 16},
                           "int8": {"quantize": "int8"}, "pca16-int8": {"pca": 16, "quantize": "int8"},
                           "binary": {"quantize": "binary"}}.items():
        summary = compress(beir["docs"], tmp_path / name, **settings)
        assert summary["vectors"] == beir["n_docs"] and summary["parts_this_run"] == 3
        got[name] = retrieval(capsys, beir, str(tmp_path / name), "--query-vectors", beir["queries"])
    # PCA at full dim is a rotation about the mean: the projected queries rank exactly as float
    assert got["rotation"]["ndcg@10"] == pytest.approx(float_["ndcg@10"], abs=1e-9)
    assert got["int8"]["ndcg@10"] == pytest.approx(float_["ndcg@10"], abs=0.02)
    assert got["pca16-int8"]["ndcg@10"] == pytest.approx(got["pca16"]["ndcg@10"], abs=0.02)
    assert got["binary"]["ndcg@10"] > 0.5 * float_["ndcg@10"]
    # the binary output keeps its int8 codes beside the bits, and says so in its accounting
    manifest = json.loads((tmp_path / "binary" / "_manifest.json").read_text())
    assert manifest["compression"]["bytes_per_vector"] == {"source": 128, "search": 4, "stored": 36}
    table = pq.read_table(next((tmp_path / "binary").glob("part-*.parquet")))
    assert table.column_names == ["id", "codes", "bits"]

    # compressed vectors are for retrieval with float queries: anything else is one line
    for argv, says in (
        (["evaluate", "retrieval", *beir["files"], "--vectors", str(tmp_path / "int8")],
         "are compressed: give --query-vectors"),
        (["evaluate", "retrieval", *beir["files"], "--vectors", beir["docs"], "--query-vectors",
          str(tmp_path / "int8")], "are compressed: only `evaluate retrieval --vectors` reads them"),
        (["evaluate", "sts", "--data", str(beir["root"] / "corpus.jsonl"), "--vectors",
          str(tmp_path / "int8")], "are compressed"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_a_rerun_skips_every_part_and_other_settings_are_refused_unless_overwritten(beir, tmp_path):
    out = tmp_path / "out"
    first = compress(beir["docs"], out, pca=8, quantize="int8")
    manifest = json.loads((out / "_manifest.json").read_text())
    again = compress(beir["docs"], out, pca=8, quantize="int8")
    assert again["parts_this_run"] == 0 and again["vectors"] == first["vectors"]
    assert json.loads((out / "_manifest.json").read_text())["parts"] == manifest["parts"]
    with pytest.raises(OutputMismatch, match="other settings or from other vectors"):
        compress(beir["docs"], out, pca=8, quantize="binary")
    redone = compress(beir["docs"], out, pca=8, quantize="binary", overwrite=True)
    assert redone["parts_this_run"] == 3 and redone["quantize"] == "binary"


@pytest.mark.parametrize("case, says", [
    ("not-a-backfill", "hold no _manifest.json: not a backfill output"),
    ("pca-too-large", "pca 64 is larger than the vectors' dim 32; give at most 32"),
    ("unknown-quantize", "unknown quantize 'int4'; allowed: none, int8, binary"),
    ("nothing-to-do", "nothing to compress: give --pca D and/or --quantize int8|binary"),
    ("inside-the-source", "lies inside the vectors' prefix"),
    ("compressed-source", "are compressed already"),
    ("onto-a-backfill", "holds a backfill, not compressed vectors"),
    ("pca-above-the-sample", "sample_size (--sample-size) 8 is below pca 16"),
    ("chunk-rows", "hold one row per chunk; compress a backfill with one row per document"),
])
def test_bad_input_is_one_line_before_any_work(beir, tmp_path, capsys, case, says):
    compressed = tmp_path / "compressed"
    if case == "compressed-source":
        compress(beir["docs"], compressed, quantize="int8")
    chunked = tmp_path / "chunked"
    if case == "chunk-rows":  # documents of 16-token windows, a row each: compressed search has no best chunk
        backfill(load_embed_config(None, input=str(beir["root"] / "corpus.jsonl"), output=str(chunked),
                                   model=str(beir["model"]), id_field="_id", chunk_tokens=16))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not vectors")
    source, output, flags = beir["docs"], str(tmp_path / "out"), ["--quantize", "int8"]
    source, output, flags = {
        "not-a-backfill": (str(tmp_path / "empty"), output, flags),
        "pca-too-large": (source, output, ["--pca", "64"]),
        "unknown-quantize": (source, output, ["--quantize", "int4"]),
        "nothing-to-do": (source, output, []),
        "inside-the-source": (source, source + "/small", flags),
        "compressed-source": (str(compressed), output, flags),
        "onto-a-backfill": (source, beir["queries"], flags),
        "pca-above-the-sample": (source, output, ["--pca", "16", "--sample-size", "8"]),
        "chunk-rows": (str(chunked), output, flags),
    }[case]
    capsys.readouterr()
    assert main(["compress", source, output, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "out" / "_manifest.json").exists()


@pytest.mark.slow
def test_compress_reads_and_writes_the_s3_server_and_keeps_its_lineage(beir, s3_env, tmp_path, capsys):
    fs = storage.filesystem("s3://bucket")
    prefix = f"bucket/compress-{tmp_path.name}"
    fs.put(beir["docs"].rstrip("/") + "/", f"{prefix}/src", recursive=True)
    src, out = f"s3://{prefix}/src", f"s3://{prefix}/out"
    # by Ray tasks (the smaller sources of the other tests compress without Ray), on the tests'
    # Ray, whose workers hold the S3 server's credentials (conftest.ray_local)
    code, stdout, stderr = cli(capsys, "compress", src, out, "--pca", "16", "--quantize", "binary", "--json",
                               "--ray-from-rows", "1")
    assert code == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["vectors"], summary["parts"], summary["dim"]) == (beir["n_docs"], 3, 16)
    assert s3_env["secret"] not in stdout + stderr

    manifest = json.loads(fs.cat(f"{prefix}/out/_manifest.json"))
    source = json.loads(fs.cat(f"{prefix}/src/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["totals"] == {"rows": beir["n_docs"], "parts": 3}
    assert manifest["ran_on"] == "ray"
    lineage = manifest["source"]
    assert lineage["uri"] == src and lineage["totals"] == source["totals"]
    assert lineage["model"]["fingerprint"] == source["model"]["fingerprint"]
    assert lineage["config_hash"] == source["config_hash"]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/src") if p.endswith(".parquet"))
    assert [p["name"] for p in manifest["parts"]] == names
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/out") if p.endswith(".parquet")) == names
    codec = json.loads(fs.cat(f"{prefix}/out/_compress.json"))
    assert codec["source"]["identity"] == lineage["identity"] and codec["codec"]["dim"] == 16
    assert s3_env["secret"] not in json.dumps(manifest) + json.dumps(codec)

    # the same compression here, locally: the same codec, the same search results from S3
    compress(beir["docs"], tmp_path / "local", pca=16, quantize="binary")
    local = json.loads((tmp_path / "local" / "_compress.json").read_text())
    assert local["codec"] == codec["codec"]
    assert json.loads((tmp_path / "local" / "_manifest.json").read_text())["ran_on"] == "driver"
    for name in names:  # each part the same, whether a Ray task or this process wrote it
        with fs.open(f"{prefix}/out/{name}", "rb") as f:
            assert pq.read_table(f).equals(pq.read_table(tmp_path / "local" / name)), name
    remote = retrieval(capsys, beir, out, "--query-vectors", beir["queries"])
    assert remote == retrieval(capsys, beir, str(tmp_path / "local"), "--query-vectors", beir["queries"])
    # a rerun finds every part done (no Ray needed); other settings are refused
    assert compress(src, out, pca=16, quantize="binary")["parts_this_run"] == 0
    capsys.readouterr()
    assert main(["compress", src, out, "--pca", "8", "--quantize", "binary"]) == 2
    assert "other settings or from other vectors" in capsys.readouterr().err


# ---------------------------------------------------------------- crashes


def snapshot(out: Path) -> dict:
    """What a user gets: each part's rows, the codec, the manifest's counts."""
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"parts": {p.name: pq.read_table(p).to_pydict() for p in sorted(out.glob("part-*.parquet"))},
            "codec": json.loads((out / "_compress.json").read_text()),
            "manifest": {k: manifest[k] for k in ("status", "parts", "totals", "compression", "source",
                                                  "config_hash")},
            "leftovers": [p.name for p in out.iterdir() if ".tmp-" in p.name]}


@pytest.mark.slow
def test_crash_after_every_write_then_rerun_gives_the_uninterrupted_output(beir, tmp_path):
    settings = {"pca": 16, "quantize": "binary"}
    compress(beir["docs"], tmp_path / "ref", **settings)
    want = snapshot(tmp_path / "ref")
    writes = 1 + 1 + 1 + 3 + 1  # lease, manifest "running", codec, each part, manifest "complete"
    # after each write (writes + 1: never fires), and before the renames of a few (SEMVEC_CRASH_TORN:
    # the first manifest's, a part's, the last manifest's), which leave their temporaries
    crashes = {(n, False): tmp_path / f"crash{n}" for n in range(1, writes + 2)}
    crashes.update({(n, True): tmp_path / f"crash{n}-torn" for n in (2, 4, 7)})

    def start(n: int, torn: bool, out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "semvec.cli", "compress", beir["docs"], str(out), "--pca", "16",
             "--quantize", "binary"], cwd=REPO, env={**os.environ, **crash_env(n, torn)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    codes = run_at_most(2, {key: (lambda key=key, out=out: start(*key, out)) for key, out in crashes.items()})
    for (n, torn), out in crashes.items():
        if n > writes:
            assert codes[n, torn][0] == 0, codes[n, torn][1][-1500:]
        else:
            assert codes[n, torn][0] == -9, f"crash at write {n} did not happen: {codes[n, torn][1][-1500:]}"
            assert not torn or any(".tmp-" in p.name for p in out.iterdir()), n  # left, as a crash leaves it
            compress(beir["docs"], out, **settings)
        assert snapshot(out) == want, (n, torn)


def test_a_config_is_checked_before_anything_is_read():
    with pytest.raises(ConfigError, match="pca must be an integer >= 1, got 0"):
        CompressConfig("a", "b", pca=0)
    with pytest.raises(ConfigError, match="sample_size must be an integer >= 1"):
        CompressConfig("a", "b", quantize="int8", sample_size=True)
