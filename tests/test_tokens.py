"""The tokenizer the backfill's tasks run without transformers (semvec.tokens) against
transformers' own, and the cached model description the plan reads instead of loading the model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from semvec import models, tokens
from semvec.chunking import special_tokens, tokenize_whole
from semvec.errors import ConfigError
from semvec.testing import corpus_sentences
from semvec.tokens import FastTokenizer, describe, load_tokenizer, tokenize
from tests.conftest import REPO

# Texts that stress normalisation and pre-tokenisation: accents, case, CJK, emoji, a special
# token written out, odd spacing, control characters, a long text that is truncated.
TEXTS = [
    "The café's crème brûlée — 3.14% better!",
    "ÅNGSTRÖM  and   naïve\tTABS\nnewlines",
    "银行卡被吞了怎么办？",
    "emoji 🙂🚀 and [SEP] written in a text [CLS] <|endoftext|>",
    "x",
    " leading and trailing spaces ",
    "zero\u200bwidth and \u00a0non-breaking",
    " ".join(corpus_sentences(30, seed=4)),
]


def model_dirs(tiny_models) -> dict[str, Path]:
    dirs = {"bert": tiny_models["bert"], "gpt": tiny_models["gpt"]}
    dirs["bundled"] = models.resolve_model(models.BUNDLED)  # a real WordPiece tokenizer
    return dirs


def same(a, b) -> None:
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
    assert a.truncated.tolist() == b.truncated.tolist()
    for field in ("special", "offsets"):
        got, want = getattr(a, field), getattr(b, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert [x.tolist() for x in got] == [x.tolist() for x in want], field


@pytest.mark.parametrize("name", ["bert", "gpt", "bundled"])
def test_the_fast_tokenizer_gives_what_transformers_gives(tiny_models, tmp_path, name):
    model_dir = model_dirs(tiny_models)[name]
    hf = load_tokenizer(model_dir)
    facts = describe(model_dir, models.fingerprint(model_dir), name)
    fast = facts.tokenizer(model_dir)
    assert isinstance(fast, FastTokenizer)
    assert special_tokens(fast) == special_tokens(hf)
    for max_length in (8, 64, 256):
        for with_offsets in (False, True):
            same(tokenize(fast, TEXTS, max_length, with_offsets),
                 tokenize(hf, TEXTS, max_length, with_offsets))
    truncated = tokenize(fast, TEXTS, 8).truncated
    assert truncated[-1] and not truncated[4]  # the long text is cut at 8, "x" is not
    whole_fast, whole_hf = tokenize_whole(fast, TEXTS), tokenize_whole(hf, TEXTS)
    assert len(whole_fast) == len(TEXTS)
    for got, want in zip(whole_fast, whole_hf, strict=True):
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
    ids = tokenize(hf, TEXTS, 256).ids[3].tolist()
    assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_a_tokenizer_that_truncates_on_the_left_keeps_doing_so(tiny_models, tmp_path):
    model_dir = Path(shutil.copytree(tiny_models["bert"], tmp_path / "left"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left"}))
    hf = load_tokenizer(model_dir)
    assert hf.truncation_side == "left"
    facts = describe(model_dir, models.fingerprint(model_dir), "left")
    assert facts.truncation_side == "left"
    same(tokenize(facts.tokenizer(model_dir), TEXTS, 12, True), tokenize(hf, TEXTS, 12, True))


def test_the_description_is_cached_by_fingerprint_and_a_bad_cache_is_rebuilt(tiny_models, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    model_dir = tiny_models["bert"]
    fingerprint = models.fingerprint(model_dir)
    first = describe(model_dir, fingerprint, "bert")
    assert first.dim == 32 and first.backend
    (cached,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert cached.name.startswith(fingerprint)
    assert describe(model_dir, fingerprint, "bert") == first
    # facts compare (and hash, for the tokenize tasks' cache) by the backend's digest
    assert first != tokens.ModelFacts(first.dim, first.backend + " ")
    assert first == tokens.ModelFacts(first.dim, str(first.backend)) and first.digest
    # a cache cut short (or edited) is described again and rewritten, not trusted
    for bad in ('{"dim": 32, "backe', '{"dim": 32}', "[]", '{"dim": 32, "backend": 5}'):
        cached.write_text(bad)
        assert describe(model_dir, fingerprint, "bert") == first
        assert json.loads(cached.read_text())["dim"] == 32
    # a leftover temporary from a crashed write is ignored
    cached.with_name(cached.name + ".tmp-dead").write_text('{"dim": 1')
    assert describe(model_dir, fingerprint, "bert") == first
    # a cache that cannot be written is only slower
    monkeypatch.setenv(models.CACHE_ENV, "/proc/semvec-cache")
    assert describe(model_dir, fingerprint, "bert") == first


def test_a_model_that_does_not_load_is_one_line_naming_it(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    model_dir = Path(shutil.copytree(tiny_models["bert"], tmp_path / "broken"))
    (model_dir / "tokenizer.json").write_text("{not json")
    (model_dir / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"^model 'my-model' cannot be loaded \(") as err:
        describe(model_dir, models.fingerprint(model_dir), "my-model")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing cached for a broken model


def test_remote_code_gets_transformers_tokenizer_and_no_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    model_dir = tiny_models["bert"]
    facts = describe(model_dir, models.fingerprint(model_dir), "bert", trust_remote_code=True)
    assert facts.backend is None
    assert not isinstance(facts.tokenizer(model_dir, True), FastTokenizer)
    assert not (tmp_path / "cache").exists()


def test_the_tokenize_stage_imports_neither_transformers_nor_torch(tiny_models):
    """What a tokenize task runs, in a fresh process: the point of semvec.tokens."""
    model_dir = tiny_models["bert"]
    facts = describe(model_dir, models.fingerprint(model_dir), "bert")
    script = (
        "import pickle, sys; import pyarrow as pa\n"
        "from semvec.backfill.stages import Tokenize\n"
        "stage = pickle.loads(sys.stdin.buffer.read())\n"
        "batch = pa.table({'text': ['a text', 'another one'],\n"
        "                  'reason': pa.array([None, None], pa.string())})\n"
        "out = stage(batch)\n"
        "assert out['input_ids'].null_count == 0, out\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    import pickle

    from semvec.backfill.stages import Tokenize

    for granularity in ("sentence", "token"):
        stage = Tokenize(str(model_dir), facts, 32, granularity, False)
        done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(stage), cwd=REPO,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert done.stdout.decode().strip() == "[]", granularity


def test_the_tokenize_stage_matches_with_and_without_a_serialized_backend(tiny_models):
    from semvec.backfill.stages import Tokenize

    model_dir = tiny_models["bert"]
    facts = describe(model_dir, models.fingerprint(model_dir), "bert")
    without = tokens.ModelFacts(facts.dim, None)
    batch = pa.table({"text": TEXTS, "reason": pa.array([None] * len(TEXTS), pa.string())})
    for granularity, chunking in (("sentence", None), ("token", None), ("sentence", (16, 4))):
        got = Tokenize(str(model_dir), facts, 16, granularity, False, chunking)(batch)
        want = Tokenize(str(model_dir), without, 16, granularity, False, chunking)(batch)
        assert got.equals(want), granularity


def test_a_backend_this_process_cannot_read_falls_back_to_transformers(tiny_models, caplog):
    # e.g. serialized by a newer `tokenizers` on the driver than a cluster worker runs
    model_dir = tiny_models["bert"]
    facts = describe(model_dir, models.fingerprint(model_dir), "bert")
    unreadable = tokens.ModelFacts(facts.dim, facts.backend.replace('"model"', '"modell"', 1))
    with caplog.at_level("WARNING", logger="semvec.tokens"):
        tok = unreadable.tokenizer(model_dir)
    assert not isinstance(tok, FastTokenizer)
    assert "does not load here" in caplog.text
    same(tokenize(tok, TEXTS, 12, True), tokenize(facts.tokenizer(model_dir), TEXTS, 12, True))


def test_a_tokenizer_that_splits_special_tokens_keeps_transformers(tiny_models, tmp_path):
    """split_special_tokens is applied by transformers per call, not stored in the backend: such a
    model gets no serialized backend, so "[SEP]" written in a text stays text."""
    model_dir = Path(shutil.copytree(tiny_models["bert"], tmp_path / "split"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    hf = load_tokenizer(model_dir)
    facts = describe(model_dir, models.fingerprint(model_dir), "split")
    assert facts.backend is None
    tok = facts.tokenizer(model_dir)
    assert not isinstance(tok, FastTokenizer)
    got = tokenize(tok, ["a [SEP] b"], 16, True)
    same(got, tokenize(hf, ["a [SEP] b"], 16, True))
    assert got.special[0].sum() == 2  # [CLS] and [SEP] around the text only
