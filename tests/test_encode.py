"""Encoder: every pooling mode on a BERT-like and a GPT-like model, batching independence."""

import numpy as np
import pytest
import torch

from semvec.config import DType, Pooling
from semvec.encode import Encoder, mapped_weights, pack
from semvec.testing import corpus_sentences


def _reference(encoder: Encoder, text: str, pooling: Pooling) -> np.ndarray:
    """One sentence alone, no padding at all: what every batching must reproduce."""
    ids = encoder.tokenizer(text, truncation=True, max_length=encoder.max_length)["input_ids"]
    with torch.inference_mode():
        hidden = encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()
    vec = {
        Pooling.MEAN: hidden.mean(0), Pooling.CLS: hidden[0],
        Pooling.MAX: hidden.max(0).values, Pooling.LAST: hidden[-1],
    }[pooling]
    return vec.numpy()


@pytest.mark.parametrize("kind", ["bert", "gpt"])
@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS, Pooling.MAX, Pooling.LAST])
def test_pooling_matches_unpadded_reference(tiny_models, kind, pooling):
    encoder = Encoder(tiny_models[kind], pooling=pooling, normalize=False, batch_tokens=256, dtype="float32")
    texts = corpus_sentences(40, seed=3)
    got = encoder.encode_texts(texts)
    want = np.stack([_reference(encoder, t, pooling) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_model_defaults_decide_pooling(tiny_models):
    assert Encoder(tiny_models["gpt"]).pooling == Pooling.LAST  # decoder: last token
    assert Encoder(tiny_models["bert"]).pooling == Pooling.MEAN


@pytest.mark.parametrize("dtype", ["float32", "bfloat16-mixed"])  # what the default may pick
@pytest.mark.parametrize("batch_tokens", [16, 97, 4096])
def test_vectors_do_not_depend_on_batching(tiny_models, batch_tokens, dtype):
    texts = corpus_sentences(60, seed=5)
    base = Encoder(tiny_models["bert"], batch_tokens=100_000, dtype=dtype).encode_texts(texts)
    other = Encoder(tiny_models["bert"], batch_tokens=batch_tokens, dtype=dtype)
    # bfloat16-mixed rounds each matrix product's output to bfloat16 (8 bits of mantissa): a sum
    # taken in another order by another batch shape can round one unit apart
    atol = 1e-5 if dtype == "float32" else 1e-4
    np.testing.assert_allclose(other.encode_texts(texts), base, atol=atol)
    # and not on which other rows share the call
    np.testing.assert_allclose(other.encode_texts(texts[::-1])[::-1], base, atol=atol)


def test_normalize_gives_unit_vectors(tiny_models):
    v = Encoder(tiny_models["bert"], normalize=True).encode_texts(corpus_sentences(10))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_truncation_is_flagged(tiny_models):
    encoder = Encoder(tiny_models["bert"], max_length=16)
    tk = encoder.tokenize(["cat " * 100, "a cat"])
    assert tk.truncated.tolist() == [True, False]
    assert len(tk.ids[0]) == 16


def test_offsets_point_into_the_text(tiny_models):
    encoder = Encoder(tiny_models["gpt"])
    text = "hello world the quick fox"
    tk = encoder.tokenize([text], with_offsets=True)
    pieces = [text[a:b] for a, b in tk.offsets[0][~tk.special[0]]]
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_pack_respects_budget_and_keeps_every_row():
    lengths = np.array([5, 300, 12, 12, 7, 1, 64])
    batches = pack(lengths, batch_tokens=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 64


@pytest.mark.parametrize("dtype,least_cosine",
                         [("float16", 0.99), ("bfloat16", 0.99), ("bfloat16-mixed", 0.999)])
def test_half_precision_is_close_to_float32(tiny_models, dtype, least_cosine):
    texts = corpus_sentences(20)
    full = Encoder(tiny_models["bert"], normalize=True, dtype="float32").encode_texts(texts)
    half = Encoder(tiny_models["bert"], normalize=True, dtype=dtype).encode_texts(texts)
    assert half.dtype == np.float32
    cosine = (full * half).sum(1)
    assert cosine.min() > least_cosine
    assert not np.array_equal(full, half)  # the lower precision really ran


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_tiny_models_are_the_same_in_every_process(tmp_path, kind):
    """Tests compare tiny-model results across processes (driver, Ray workers, reruns)."""
    import subprocess
    import sys

    build = ("import sys, pathlib; from semvec.testing import build_tiny_model; "
             "build_tiny_model(pathlib.Path(sys.argv[1]), sys.argv[2])")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", build, str(tmp_path / name), kind], check=True)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_truncation_is_flagged_by_a_tokenizer_that_reports_no_overflow(tiny_models):
    """Some tokenizers ignore return_overflowing_tokens; truncation is then found by counting."""
    from semvec.tokens import load_tokenizer, tokenize

    real = load_tokenizer(tiny_models["bert"])

    def without_overflow(texts, **kw):  # the first window of each text, and no mapping
        enc = real(texts, **kw)
        mapping = enc.get("overflow_to_sample_mapping")
        if mapping is None:
            return enc
        first = [list(mapping).index(i) for i in range(len(texts))]
        return {k: [v[p] for p in first] for k, v in enc.items() if k != "overflow_to_sample_mapping"}

    texts = [" ".join(corpus_sentences(20, seed=1)), "short"]
    got = tokenize(without_overflow, texts, 16, with_offsets=True)
    want = tokenize(real, texts, 16, with_offsets=True)
    assert got.truncated.tolist() == want.truncated.tolist() == [True, False]
    assert [i.tolist() for i in got.ids] == [i.tolist() for i in want.ids]
    assert [o.tolist() for o in got.offsets] == [o.tolist() for o in want.offsets]


def test_auto_precision_is_the_fastest_that_holds_the_bar_on_the_device(monkeypatch, tiny_models):
    from semvec import precision

    assert "fpu" in precision.cpu_flags()  # this machine's, from /proc/cpuinfo
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert precision.resolve("auto", "cpu") == (DType.BFLOAT16_MIXED,
                                                "auto: the CPU has bfloat16 units (amx_bf16)")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    dtype, why = precision.resolve("auto", "cpu")
    assert dtype == DType.FLOAT32 and "no bfloat16 units" in why
    assert precision.resolve("auto", "mps")[0] == DType.FLOAT32
    assert precision.resolve("float32", "cpu") == precision.resolve("float32", "cuda") == \
        (DType.FLOAT32, "pinned (--dtype)")
    # the encoder runs what it resolves, with that precision's batch size
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    fast = Encoder(tiny_models["bert"])
    assert (fast.dtype, fast.autocast, fast.batch_tokens) == (DType.BFLOAT16_MIXED, torch.bfloat16, 2048)
    monkeypatch.setattr(precision, "cpu_flags", set)
    plain = Encoder(tiny_models["bert"])
    assert (plain.dtype, plain.autocast, plain.batch_tokens) == (DType.FLOAT32, None, 1024)


@pytest.mark.parametrize("dtype,mapped", [("float32", True), ("bfloat16-mixed", True), ("float16", False)])
def test_weights_stay_in_the_memory_mapped_file_unless_cast(tiny_models, dtype, mapped):
    # Actors on one node then share one copy of the weights (the page cache); a cast copies them.
    enc = Encoder(tiny_models["bert"], dtype=dtype, device="cpu")
    inside, total = mapped_weights(enc.model)
    assert total > 0 and inside == (total if mapped else 0)


def test_models_load_without_kernels_from_the_hub(tiny_models):
    """transformers 5 replaces some layers with kernels it downloads from the Hugging Face Hub
    unless `use_kernels=False`: semvec runs only what the model directory and PyTorch hold."""
    import transformers

    encoder = Encoder(tiny_models["bert"])
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert encoder.model.use_kernels is False
