"""Fine-tuning methods: one matrix over every method x {BERT, GPT2} on the tiny seeded models."""

import json
import re

import pytest
import torch
from transformers import AutoModel

from semvec.config import Pooling
from semvec.encode import pool
from semvec.errors import ConfigError
from semvec.extras import load_extras
from semvec.tokens import load_tokenizer
from semvec.train.config import Method, MethodConfig
from semvec.train.methods import (
    apply_method,
    count_parameters,
    export_model,
)

KINDS = ["bert", "gpt"]
SENTENCES = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat"]
# Which parameter names each method may train (and must: the match is both ways).
TRAINS = {
    Method.FULL: lambda name: True,
    Method.LORA: lambda name: "lora_" in name,
    Method.PROMPT: lambda name: name == "prompt",
    Method.ADAPTER: lambda name: name.startswith("adapters."),
    Method.BITFIT: lambda name: name.endswith("bias"),
}
LR = {Method.FULL: 1e-3, Method.LORA: 1e-2, Method.PROMPT: 2e-2, Method.ADAPTER: 1e-2,
      Method.BITFIT: 1e-2}
# Embeddings and layer 0, under any wrapper prefix (BERT: embeddings, encoder.layer.0; GPT2: wte, wpe, h.0)
FROZEN = re.compile(r"(^|\.)(embeddings|wte|wpe|encoder\.layer\.0|h\.0)\.")

matrix = pytest.mark.parametrize("method", list(Method))
kinds = pytest.mark.parametrize("kind", KINDS)


def _load(model_dir):
    return AutoModel.from_pretrained(str(model_dir)).eval()


def _batch(model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of different lengths, so the mask matters."""
    enc = load_tokenizer(model_dir)(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _encoder(model_dir, method, **options):
    torch.manual_seed(0)
    return apply_method(_load(model_dir), method, MethodConfig(**options))


def _loss(encoder, ids, mask, target) -> torch.Tensor:
    hidden, mask = encoder(ids, mask)
    return ((pool(hidden, mask, Pooling.MEAN) - target) ** 2).mean()


def _trained(model_dir, method, steps: int = 8):
    """A MethodEncoder after a few AdamW steps toward a random target; returns it and the losses."""
    encoder = _encoder(model_dir, method)
    ids, mask = _batch(model_dir)
    target = torch.randn(len(SENTENCES), encoder.base.config.hidden_size)
    with torch.no_grad():
        before = _loss(encoder.eval(), ids, mask, target).item()
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=LR[method])
    encoder.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(encoder, ids, mask, target).backward()
        opt.step()
    with torch.no_grad():
        after = _loss(encoder.eval(), ids, mask, target).item()
    return encoder, before, after


@kinds
@matrix
def test_starts_as_the_base_model(tiny_models, kind, method):
    ids, mask = _batch(tiny_models[kind])
    with torch.no_grad():
        want = _load(tiny_models[kind])(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden, out_mask = _encoder(tiny_models[kind], method).eval()(ids, mask)
    assert hidden.shape == want.shape
    assert torch.equal(out_mask, mask)
    if method == Method.PROMPT:  # the virtual tokens change the context by design
        assert not torch.allclose(hidden, want, atol=1e-3)
    else:
        torch.testing.assert_close(hidden, want, atol=1e-5, rtol=0)


@kinds
@matrix
def test_only_the_method_parameters_train(tiny_models, kind, method):
    encoder = _encoder(tiny_models[kind], method)
    names = dict(encoder.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n in names if TRAINS[method](n)}
    n_trainable, n_total = count_parameters(encoder)
    assert n_trainable == sum(names[n].numel() for n in trainable)
    if method == Method.FULL:
        assert n_trainable == n_total
    else:
        assert 0 < n_trainable < n_total


@pytest.fixture(scope="module")
def trained(tiny_models):
    """Train once per (kind, method); the loss and export tests only read the result."""
    cache = {}

    def get(kind, method):
        if (kind, method) not in cache:
            cache[kind, method] = _trained(tiny_models[kind], method)
        return cache[kind, method]

    return get


@kinds
@matrix
def test_a_few_steps_reduce_the_loss(trained, kind, method):
    _, before, after = trained(kind, method)
    # Both losses are measured the same way (eval mode), so any drop is learning, not noise.
    # Prompt tuning steers a 2-layer model only through attention: it moves slowly, so no margin.
    assert after < (before if method == Method.PROMPT else 0.9 * before), (before, after)


@kinds
@matrix
def test_export_then_load_reproduces_the_trained_encoder(tiny_models, trained, tmp_path, kind, method):
    encoder, _, _ = trained(kind, method)
    out = tmp_path / "out"
    info = export_model(encoder, out)
    assert info["method"] == method.value
    assert json.loads(json.dumps(info)) == info  # it goes into semvec.json as is
    loaded = load_extras(out, _load(out), info)
    ids, mask = _batch(tiny_models[kind])
    with torch.no_grad():
        want = encoder(ids, mask)[0]
        torch.testing.assert_close(loaded(ids, mask)[0], want, atol=1e-5, rtol=0)
        if method == Method.LORA:  # merged: the directory alone is the trained model
            plain = _load(out)(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(plain, want, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    if method == Method.LORA:  # and the unmerged adapter loads onto the original base
        from peft import PeftModel

        unmerged = PeftModel.from_pretrained(_load(tiny_models[kind]), str(out / "lora_adapter")).eval()
        with torch.no_grad():
            got = unmerged(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@kinds
@matrix
def test_freezing_applies_on_top_of_each_method(tiny_models, kind, method):
    plain = {n for n, p in _encoder(tiny_models[kind], method).named_parameters() if p.requires_grad}
    encoder = _encoder(tiny_models[kind], method, freeze_embeddings=True, freeze_layers=1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n in plain if not FROZEN.search(n)}
    if method == Method.FULL:  # the pattern really covers embeddings and layer 0, nothing else
        frozen = sorted(plain - trainable)
        assert any("layer.0." in n or "h.0." in n for n in frozen)
        assert any("embeddings." in n or "wte." in n for n in frozen)
        assert any("layer.1." in n or "h.1." in n for n in trainable)


@pytest.mark.parametrize("options, bad", [
    ({"lora_r": 0}, "lora_r"),
    ({"lora_alpha": -4}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"prompt_tokens": 0}, "prompt_tokens"),
    ({"adapter_size": 2.5}, "adapter_size"),
    ({"freeze_layers": -1}, "freeze_layers"),
    ({"lora_targets": []}, "lora_targets"),
])
def test_bad_config_names_the_value(options, bad):
    with pytest.raises(ConfigError, match=bad):
        MethodConfig(**options)


def test_bad_choices_fail_before_the_model_changes(tiny_models):
    model = _load(tiny_models["bert"])
    with pytest.raises(ConfigError, match="allowed: full, lora, prompt, adapter, bitfit"):
        apply_method(model, "qlora", MethodConfig())
    with pytest.raises(ConfigError, match="freeze_layers 3 exceeds the model's 2 layers"):
        apply_method(model, Method.FULL, MethodConfig(freeze_layers=3))
    with pytest.raises(ConfigError, match="nope.*available: .*query"):
        apply_method(model, Method.LORA, MethodConfig(lora_targets=["query", "nope"]))
    with pytest.raises(ConfigError, match="model type 'Linear'"):
        apply_method(torch.nn.Linear(4, 4), Method.ADAPTER, MethodConfig())
    assert all(p.requires_grad for p in model.parameters())  # untouched by the failed calls


def test_defaults_depend_on_method_and_task_and_given_values_win():
    from semvec.train.config import load_train_config

    def cfg(task, method, **given):
        return load_train_config(None, task=task, method=method, train="t", output="o", **given)

    ner = cfg("ner", "full")
    assert (ner.epochs, ner.learning_rate) == (6, 1e-4)
    sts = cfg("sts", "full")
    assert (sts.epochs, sts.learning_rate) == (4, 2e-5)
    assert cfg("ner", "lora").epochs == 4
    bitfit = cfg("ner", "bitfit")
    assert (bitfit.epochs, bitfit.learning_rate) == (6, 3e-3)
    assert cfg("sts", "bitfit").learning_rate == 1e-3
    given = cfg("ner", "full", epochs=2, lr=3e-5)
    assert (given.epochs, given.learning_rate) == (2, 3e-5)
    assert cfg("ner", "full", epochs=None).epochs == 6  # None means "not given" (a CLI flag left out)
