"""Static models (`semvec distill`) and word vectors (`semvec words`) on tiny models: the
directory sentence-transformers loads, a backfill with no transformer (local Ray, and the S3
server), word2vec files gensim reads, and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semvec import models, storage
from semvec.backfill.job import run
from semvec.cli import main
from semvec.config import Pooling, load_embed_config
from semvec.distill import (
    Frame,
    pca,
    placeholders,
    special_frame,
    static_vectors,
    token_vectors,
    zipf_weights,
)
from semvec.encode import Encoder
from semvec.errors import ConfigError
from semvec.testing import corpus_sentences
from tests.conftest import REPO, cli, write_jsonl

DIMS = 16  # below the tiny models' 32


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (unit(a) * unit(b)).sum(1)


@pytest.fixture(scope="module")
def static_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT distilled once, through the command line."""
    out = tmp_path_factory.mktemp("static") / "model"
    assert main(["distill", "--model", str(tiny_models["bert"]), "--output", str(out),
                 "--dims", str(DIMS), "--json"]) == 0
    return out


def texts() -> list[str]:
    # an empty row, a word of unknown characters and a special token's text among ordinary ones
    return corpus_sentences(40, seed=5) + ["", "日本 zebra", "[CLS] the cat", "fox " * 200]


# ---------------------------------------------------------------- distill


def test_distill_writes_a_static_model_directory(static_model, tiny_models):
    from safetensors.numpy import load_file

    files = sorted(p.name for p in static_model.iterdir())
    assert files == ["1_Normalize", "model.safetensors", "modules.json", "semvec.json", "tokenizer.json",
                     "tokenizer_config.json"]
    card = models.read_card(static_model)
    assert card.kind == models.ModelKind.STATIC and card.pooling == "mean" and card.normalize
    assert card.method["method"] == "distill" and card.method["dims"] == DIMS
    assert card.method["frame"] == "swapped" and card.method["placeholders"] == 0
    assert card.base_fingerprint == models.fingerprint(tiny_models["bert"])
    table = load_file(str(static_model / "model.safetensors"))["embedding.weight"]
    base = Encoder(tiny_models["bert"])
    assert table.shape == (len(base.tokenizer), DIMS) and table.dtype == np.float32
    assert models.resolve_model(str(static_model)) == static_model.resolve()
    assert models.static_dim(static_model) == DIMS
    # the static tokenizer adds no [CLS]/[SEP] and keeps every piece of a long text
    static = Encoder(static_model)
    assert static.tokenize(["the cat"]).ids[0].tolist() == base.tokenize(["the cat"]).ids[0][1:-1].tolist()
    assert len(static.tokenize(["fox " * 500]).ids[0]) == 500


def test_pca_and_zipf_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5, 4, 3, 2, 1, 0.5, 0.2, 0.1])
    y = pca(x, 3)
    assert y.shape == (500, 3) and np.allclose(y.mean(0), 0)
    var = y.var(0)
    assert var[0] > var[1] > var[2] and np.allclose(np.cov(y.T), np.diag(np.diag(np.cov(y.T))), atol=1e-8)
    assert np.allclose(pca(x, 3), y)  # signs fixed: a rerun writes the same table
    w = zipf_weights(1000, 1e-3)
    assert np.all(np.diff(w) > 0) and 0 < w[0] < w[-1] < 1  # frequent (low rank) tokens weigh less
    live = np.arange(500) % 5 != 0  # every fifth row a placeholder
    table = static_vectors(x, live, 3, 1e-3)
    assert table.shape == (500, 3) and table.dtype == np.float32 and not table[~live].any()
    assert np.allclose(table[live], pca(x[live], 3) * zipf_weights(400, 1e-3)[:, None], atol=1e-5)
    assert np.allclose(static_vectors(x, live, 3, 0)[live], pca(x[live], 3), atol=1e-5)


def test_tokens_go_through_the_model_framed_and_placeholders_are_left_out(tiny_models):
    base = Encoder(tiny_models["bert"], normalize=False)
    cls, sep = base.tokenizer.cls_token_id, base.tokenizer.sep_token_id
    assert special_frame(base.tokenizer) == ([cls], [sep])
    live = np.ones(len(base.tokenizer), dtype=bool)
    live[:3] = False
    raw = token_vectors(base, Frame.SWAPPED, live)
    cat = base.tokenizer.convert_tokens_to_ids("cat")
    assert np.allclose(raw[cat], base.encode_ids([np.array([sep, cat, cls])])[0][0], atol=1e-6)
    assert not raw[:3].any()
    model_framed = token_vectors(base, Frame.MODEL, live)
    assert np.allclose(model_framed[cat], base.encode_texts(["cat"])[0], atol=1e-6)  # as the text has it
    tok = base.tokenizer
    tok.add_tokens(["[unused0]", "[unused17]"])
    assert placeholders(tok).sum() == 2 and placeholders(tok)[-2:].all()


def test_sentence_transformers_loads_it_and_matches_semvec(static_model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(static_model), device="cpu")
    assert type(st[0]).__name__ == "StaticEmbedding" and st.encode(['x']).shape == (1, DIMS)
    want = st.encode(texts(), convert_to_numpy=True)
    got = Encoder(static_model).encode_texts(texts())
    assert np.allclose(got, want, atol=1e-6)
    assert not got[len(corpus_sentences(40, seed=5))].any()  # an empty text: zeros, as in StaticEmbedding


def test_token_vectors_of_a_static_model_are_its_table_rows(static_model):
    enc = Encoder(static_model, normalize=False)
    ids = enc.tokenize(["the quick brown fox", "a"]).ids
    pooled, tokens = enc.encode_ids(ids, with_tokens=True)
    assert np.allclose(tokens[0], enc.static.vectors.numpy()[ids[0]])
    assert np.allclose(pooled[0], tokens[0].mean(0), atol=1e-6)
    first = Encoder(static_model, pooling=Pooling.CLS, normalize=False).encode_ids(ids)[0]
    assert np.allclose(first[0], tokens[0][0])


def test_a_backfill_of_a_static_model_equals_sentence_transformers(ray_local, static_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    rows = texts()
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(rows)])
    summary = run(load_embed_config(None, input=str(src), output=str(tmp_path / "out"),
                                    model=str(static_model), id_field="id", batch_rows=16))
    assert summary["embedded"] == len(rows) - 1 and summary["quarantined"] == 1  # the empty row
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model"]["dim"] == DIMS and manifest["model"]["normalize"] is True
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))])
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    n_tokens = dict(zip(table["id"].to_pylist(), table["n_tokens"].to_pylist(), strict=True))
    want = SentenceTransformer(str(static_model), device="cpu").encode(rows, convert_to_numpy=True)
    keep = [i for i, t in enumerate(rows) if t]
    vectors = np.array([got[f"r{i}"] for i in keep])
    assert cosines(vectors, want[keep]).min() >= 0.9999
    assert n_tokens["r3"] == len(rows[3].split()) and n_tokens[f"r{len(rows) - 1}"] == 200
    assert not np.any(table["truncated"].to_numpy())


def test_a_static_model_distilled_to_and_backfilled_on_the_s3_server(ray_local, static_model, tiny_models,
                                                                    s3_env, tmp_path, monkeypatch, capsys):
    """The model distilled onto the S3 server, input and output there too; the backfill runs on the
    tests' Ray, whose workers get the server's credentials from its runtime_env as a cluster job's
    workers do."""
    from sentence_transformers import SentenceTransformer

    root = f"s3://{s3_env['bucket']}/static-{uuid.uuid4().hex[:8]}"
    fs = storage.filesystem(root)
    assert main(["distill", "--model", str(tiny_models["bert"]), "--output", f"{root}/model",
                 "--dims", str(DIMS)]) == 0
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{storage.strip(root)}/model")} >= {
        "model.safetensors", "tokenizer.json", "modules.json", "semvec.json"}
    rows = corpus_sentences(60, seed=9)
    fs.pipe(f"{storage.strip(root)}/in/a.jsonl",
            "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(rows)).encode())
    monkeypatch.setenv("SEMVEC_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "embed", f"{root}/in/", f"{root}/out", "--model", f"{root}/model",
                         "--id-field", "id", "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["embedded"] == 60
    assert s3_env["secret"] not in out + err
    parts = [p for p in fs.ls(f"{storage.strip(root)}/out") if p.rsplit("/", 1)[-1].startswith("part-")]
    table = pa.concat_tables([pq.read_table(fs.open(p)) for p in parts])
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    want = SentenceTransformer(str(static_model), device="cpu").encode(rows, convert_to_numpy=True)
    assert cosines(np.array([got[f"r{i}"] for i in range(60)]), want).min() >= 0.9999


def _model_files(uri: str) -> dict[str, bytes]:
    fs, root = storage.filesystem(uri), storage.strip(uri)
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


PUBLISH = ("import sys; from pathlib import Path; from semvec import crashpoints, models; "
           "crashpoints.arm(); models.publish(Path(sys.argv[1]), sys.argv[2])")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_distill_crashed_after_every_write_then_rerun(tiny_models, s3_env, tmp_path, where):
    """SIGKILL after each write of the publish (local: the staged copy, the rename; s3: the partial
    mark, the old files' removal, each file, the card last, the mark's removal); a model cut short
    is refused by readers, the rerun with --overwrite ends with the model an uncrashed run writes,
    and a crash's leftovers are not refused as foreign files. Locally the whole command is crashed;
    on s3, to spare a model load per write, a process that publishes the reference's files
    (models.publish, which `semvec distill` and `semvec train` call) is."""
    base = (f"s3://{s3_env['bucket']}/distill-crash-{uuid.uuid4().hex[:8]}" if where == "s3"
            else str(tmp_path / "models"))
    args = ["distill", "--model", str(tiny_models["bert"]), "--dims", str(DIMS)]
    built = tmp_path / "built"
    assert main([*args, "--output", str(built)]) == 0
    assert main([*args, "--output", f"{base}/reference"]) == 0
    want = _model_files(f"{base}/reference")
    for k in range(1, 30):
        out = f"{base}/crash{k}"
        command = (["-c", PUBLISH, str(built), out] if where == "s3"
                   else ["-m", "semvec.cli", *args, "--output", out])
        crashed = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                                 env={**os.environ, "SEMVEC_CRASH_AT": str(k)}, timeout=300)
        if crashed.returncode == 0:  # k is past the last write
            break
        assert crashed.returncode == -9, crashed.stderr[-1500:]
        if models.PARTIAL in _model_files(out):  # s3, cut short: a reader refuses it
            with pytest.raises(ConfigError, match=r"is incomplete: its writing was cut short"):
                models.resolve_model(out)
        assert main([*args, "--output", out, "--overwrite"]) == 0
        assert _model_files(out) == want, k
    writes = 2 if where == "local" else len(want) + 3  # s3: and the old files' removal
    assert k == writes + 1
    if where == "local":  # no staged copy left beside the outputs
        assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
            ["reference", *(f"crash{i}" for i in range(1, k + 1))])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_model_published_over_another_keeps_none_of_its_files(s3_env, tmp_path, where):
    """`semvec train` put an s3:// model over the old one file by file: an adapter or a head of
    the old model stayed beside the new one's weights."""
    out = (f"s3://{s3_env['bucket']}/replaced-{uuid.uuid4().hex[:8]}" if where == "s3"
           else str(tmp_path / "out"))
    if where == "local":  # through a link: the folder it names is replaced, the link stays
        (tmp_path / "real").mkdir()
        (tmp_path / "out").symlink_to(tmp_path / "real")
    for name, files in (("old", ["semvec.json", "head.safetensors", "lora_adapter/a.safetensors"]),
                        ("new", ["semvec.json", "model.safetensors"])):
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_text(f"{name} {f}")
        models.check_output(out, replace=True)
        models.publish(tmp_path / name, out)
    assert _model_files(out) == {f: f"new {f}".encode() for f in ("semvec.json", "model.safetensors")}
    if where == "local":
        assert (tmp_path / "out").is_symlink()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing aside left


def test_an_s3_model_is_not_replaced_by_its_own_output(tiny_models, s3_env, capsys):
    """The model is read through a local cache, which no s3:// output overlaps: the prefixes are
    compared instead (distill --overwrite and train would have removed a semvec model)."""
    root = f"s3://{s3_env['bucket']}/own-{uuid.uuid4().hex[:8]}"
    fs = storage.filesystem(root)
    fs.put(str(tiny_models["bert"]), f"{storage.strip(root)}/m", recursive=True)
    card = {"pooling": "mean", "normalize": True, "max_length": 64}
    fs.pipe(f"{storage.strip(root)}/m/semvec.json", json.dumps(card).encode())
    for output, says in ((f"{root}/m", "is the model"), (root, "holds the model"),
                         (f"{root}/m/sub", "lies inside the model")):
        with pytest.raises(ConfigError, match=f"output '{output}' {says} '{root}/m'; choose a prefix"):
            models.check_apart_from_model(output, f"{root}/m", models.resolve_model(f"{root}/m"))
    code, _, err = cli(capsys, "distill", "--model", f"{root}/m", "--output", f"{root}/m", "--overwrite")
    assert code == 2 and f"output '{root}/m' is the model" in err, err
    assert models.resolve_model(f"{root}/m")  # still there


def test_words_crashed_after_its_write_then_rerun(tiny_models, tmp_path):
    """Its one write is the whole file (a rename): a crash right after it leaves the whole file, and
    the rerun with --overwrite writes the same bytes."""
    (tmp_path / "vocab.txt").write_text("cat\ndog\nred\n")
    args = ["words", "--model", str(tiny_models["bert"]), "--vocab", str(tmp_path / "vocab.txt"),
            "--output", str(tmp_path / "w.txt")]
    crashed = subprocess.run([sys.executable, "-m", "semvec.cli", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "SEMVEC_CRASH_AT": "1"})
    assert crashed.returncode == -9, crashed.stderr[-1500:]
    first = (tmp_path / "w.txt").read_bytes()
    assert first.startswith(b"3 32\n") and len(first.splitlines()) == 4
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "w.txt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.txt", "w.txt"]  # no temporary left


def test_evaluate_scores_a_static_model(static_model, tmp_path, capsys):
    pairs = [("the cat sat", "a cat sat on the mat", 4.0), ("the dog ran", "red car", 0.5),
             ("blue river", "the blue river", 4.5), ("fire", "water and earth", 1.0)]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"sentence1": a, "sentence2": b, "score": x}
                                                  for a, b, x in pairs])
    assert main(["evaluate", "sts", "--data", str(data), "--model", str(static_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 4


# ---------------------------------------------------------------- words


VOCAB = ["cat", "dog", "", "river", "cat", "zebra", "  fox  ", "日本", "tree", "dog", "city", " \t "]
WORDS = ["cat", "dog", "river", "zebra", "fox", "日本", "tree", "city"]  # as read: in order, once


@pytest.mark.parametrize("kind", ["transformer", "static"])
def test_words_to_word2vec_load_in_gensim(kind, tiny_bert, static_model, tmp_path, capsys):
    from gensim.models import KeyedVectors

    model = tiny_bert if kind == "transformer" else static_model
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    out = tmp_path / "vectors.txt"
    assert main(["words", "--model", str(model), "--vocab", str(vocab), "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["words"] == len(WORDS) and summary["kind"] == kind
    # 日本 is [UNK] [UNK]
    assert (summary["blank_lines"], summary["duplicates"], summary["unknown"]) == (2, 2, 1)
    kv = KeyedVectors.load_word2vec_format(str(out), binary=False)
    assert kv.index_to_key == WORDS and kv.vector_size == (32 if kind == "transformer" else DIMS)
    want = Encoder(model).encode_texts(WORDS)  # a word's vector is its one-word text's
    assert np.allclose(np.stack([kv[w] for w in WORDS]), want, rtol=1e-5, atol=1e-6)
    similar = kv.most_similar("cat", topn=3)
    assert len(similar) == 3 and all(w in WORDS and w != "cat" for w, _ in similar)
    assert similar[0][1] >= similar[1][1] >= similar[2][1]


def test_words_to_parquet_with_pieces(static_model, tmp_path):
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(VOCAB + ["new york"]) + "\n")  # a phrase is fine in parquet
    out = tmp_path / "words.parquet"
    assert main(["words", "--model", str(static_model), "--vocab", str(vocab), "--output", str(out),
                 "--format", "parquet"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["word", "embedding", "n_pieces"]
    assert table["word"].to_pylist() == WORDS + ["new york"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIMS)
    pieces = dict(zip(table["word"].to_pylist(), table["n_pieces"].to_pylist(), strict=True))
    assert pieces["cat"] == 1 and pieces["zebra"] == 5 and pieces["new york"] == 7  # z ##e ##b ##r ##a
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(vectors, Encoder(static_model).encode_texts(WORDS + ["new york"]), atol=1e-6)


def test_a_word_with_no_piece_is_counted_and_warned(static_model, tmp_path, capsys, caplog):
    vocab = tmp_path / "words.txt"
    vocab.write_text("cat\n\u200b\ndog\n")  # a zero-width space: not blank, and BERT drops it
    logger = logging.getLogger("semvec.words")  # semvec's own handler may not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="semvec.words"):
            code = main(["words", "--model", str(static_model), "--vocab", str(vocab), "--output",
                         str(tmp_path / "w.parquet"), "--format", "parquet"])
    finally:
        logger.removeHandler(caplog.handler)
    out = capsys.readouterr().out
    assert code == 0 and "3 words x" in out and "only unknown pieces, 1 with no piece; output" in out
    assert "1 word(s) have no piece in this model's vocabulary (e.g. '\\u200b')" in caplog.text
    assert pq.read_table(tmp_path / "w.parquet")["n_pieces"].to_pylist() == [1, 0, 1]


# ---------------------------------------------------------------- errors and cards


def test_bad_input_is_one_line_and_exit_2(static_model, tiny_bert, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "ok.txt").write_text("cat\ndog\n")
    (tmp_path / "phrase.txt").write_text("cat\nnew york\n")
    (tmp_path / "taken.txt").write_text("already here")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i % 5})
                             + "\n" for i in range(20)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    holder = tmp_path / "holder"  # a model directory (its card) with the model to distil inside
    shutil.copytree(tiny_bert, holder / "m")
    (holder / "semvec.json").write_text(json.dumps({"kind": "static"}))
    own = Path(shutil.copytree(tiny_bert, tmp_path / "own"))  # a semvec model, its card and all
    (own / "semvec.json").write_text(json.dumps({"pooling": "mean", "normalize": True, "max_length": 64}))
    out = str(tmp_path / "o")
    words = ["words", "--model", str(tiny_bert), "--vocab"]
    cases = {
        "dims too large": (["distill", "--model", str(tiny_bert), "--output", out, "--dims", "64"],
                           "dims 64 exceeds the model's 32 dimensions; allowed: 1 to 32"),
        "dims zero": (["distill", "--model", str(tiny_bert), "--output", out, "--dims", "0"],
                      "dims (--dims) must be a positive integer, got 0"),
        "negative zipf": (["distill", "--model", str(tiny_bert), "--output", out, "--zipf", "-1"],
                          "zipf (--zipf) must be a number >= 0"),
        "no output": (["distill", "--model", str(tiny_bert)], "missing required setting 'output'"),
        "output not empty": (["distill", "--model", str(tiny_bert), "--output", str(tmp_path / "full")],
                             "is not empty; choose an empty directory or pass --overwrite"),
        # --overwrite removed the whole output folder: '.', or a folder holding the model, went
        "overwrite what is not a model": (
            ["distill", "--model", str(tiny_bert), "--output", str(tmp_path / "full"), "--overwrite"],
            "holds files that are not a semvec model (no semvec.json); only a model directory is "
            "replaced"),
        "overwrite the model itself": (
            ["distill", "--model", str(own), "--output", str(own), "--overwrite"],
            f"output '{own}' is the model '{own}'; choose a folder of its own"),
        "overwrite the model's folder": (
            ["distill", "--model", str(holder / "m"), "--output", str(holder), "--overwrite"],
            f"output '{holder}' holds the model '{holder / 'm'}'; choose a folder of its own"),
        "inside the model": (
            ["distill", "--model", str(own), "--output", str(own / "sub")],
            f"output '{own / 'sub'}' lies inside the model '{own}'; choose a folder of its own"),
        "static again": (["distill", "--model", str(static_model), "--output", out],
                         "is a static model already"),
        "empty vocab": ([*words, str(tmp_path / "empty.txt"), "--output", out],
                        "holds no words (3 lines, 3 blank)"),
        "missing vocab": ([*words, str(tmp_path / "none.txt"), "--output", out], "does not exist"),
        "unknown format": ([*words, str(tmp_path / "ok.txt"), "--output", out, "--format", "glove"],
                           "unknown format 'glove'; allowed: word2vec, parquet"),
        "a phrase in word2vec": ([*words, str(tmp_path / "phrase.txt"), "--output", out],
                                 "line 2 holds 'new york', with whitespace inside"),
        "output exists": ([*words, str(tmp_path / "ok.txt"), "--output", str(tmp_path / "taken.txt")],
                          "exists; pass --overwrite to replace it"),
        "output not writable": ([*words, str(tmp_path / "ok.txt"), "--output",
                                 str(tmp_path / "taken.txt" / "w.txt")], "cannot be written there"),
        "train a static model": (["train", "--task", "sts", "--method", "full", "--train", str(pairs),
                                  "--model", str(static_model), "--output", out],
                                 "is a static model (a table of token vectors): it has no transformer"),
    }
    for name, (args, message) in cases.items():
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and message in err, (name, err)
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "full" / "x").exists() and (holder / "m" / "config.json").exists()
    assert (own / "config.json").exists()


def test_cards_without_a_kind_are_transformers_and_an_unknown_kind_is_refused(tiny_bert):
    card = {"pooling": "mean", "normalize": True, "max_length": 64}
    (tiny_bert / "semvec.json").write_text(json.dumps(card))  # written before kind existed
    assert models.read_card(tiny_bert).kind == models.ModelKind.TRANSFORMER
    assert models.model_kind(tiny_bert) == models.ModelKind.TRANSFORMER
    models.write_card(tiny_bert, models.read_card(tiny_bert))
    assert json.loads((tiny_bert / "semvec.json").read_text())["kind"] == "transformer"
    (tiny_bert / "semvec.json").write_text(json.dumps({**card, "kind": "hologram"}))
    with pytest.raises(ConfigError, match="unknown kind 'hologram'; allowed: transformer, static"):
        models.read_card(tiny_bert)


def test_a_static_directory_without_its_table_is_refused(static_model, tmp_path):
    broken = Path(shutil.copytree(static_model, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="static model .* has no model.safetensors"):
        models.resolve_model(str(broken))


def test_a_registered_static_model_resolves_again_from_its_cache(static_model, mlflow_server, tmp_path,
                                                                monkeypatch):
    """The cache took a copy without config.json (a static model has none) for one cut short, and
    the second resolve failed renaming a fresh download onto it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    name = f"static-{uuid.uuid4().hex[:8]}"
    version = models.register_model(str(static_model), name)
    first = models.resolve_model(f"models:/{name}/{version}")
    assert models.resolve_model(f"models:/{name}/{version}") == first
    assert models.read_card(first).kind == models.ModelKind.STATIC
