"""Tiny seeded models and corpora for tests and benchmarks, built offline in seconds.

A 2-layer model with hidden size 32 and its own small tokenizer (BERT: a written-out WordPiece
vocabulary; GPT: byte-level BPE trained here on random sentences): enough to exercise every code
path without a hub or a real model.
"""

from __future__ import annotations

import copy
import string
from pathlib import Path

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green house car tree river city "
    "model vector search text token embed train data cluster quick brown fox jumps over lazy "
    "hello world semantic language night day sun moon water fire earth air one two three"
).split()


def corpus_sentences(n: int = 200, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]


def _bert_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The vocabulary is written out, not trained: the WordPiece trainer breaks ties in whatever
    # order its hash maps give, so a trained vocabulary (and every tiny-model result) changed from
    # one process to the next. Whole words from WORDS, then every character alone and as "##x".
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = specials + chars + [f"##{c}" for c in chars] + sorted(set(WORDS) - set(chars))
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)
    fast.save_pretrained(path)
    return fast


def _gpt_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_sentences(500), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", model_max_length=128)
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path, kind: str = "bert", seed: int = 0, init_std: float = 0.02) -> Path:
    """A seeded 2-layer model with hidden size 32 and its own tokenizer, saved as safetensors.

    init_std is the weights' initial standard deviation (Hugging Face's initializer_range).
    """
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "bert":
        tok = _bert_tokenizer(path)
        config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                            initializer_range=init_std)
        model = BertModel(config)
    else:
        tok = _gpt_tokenizer(path)
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            initializer_range=init_std)
        model = GPT2Model(config)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


class LocalSession:
    """One worker in this process, no Ray: the same loop, for tests and quick checks. Reports are
    kept in ``reports`` as (metrics, state or None)."""

    rank, world = 0, 1

    def __init__(self, resume: dict | None = None):
        self.reports: list[tuple[dict, dict | None]] = []
        self._resume = resume

    def resume_state(self) -> dict | None:
        return self._resume

    def examples(self, given: tuple[list[dict], list[dict]]) -> tuple[list[dict], list[dict]]:
        return given  # (train, dev) as the test passes them

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def prepare(self, model):
        return model

    def report(self, metrics: dict, state: dict | None = None) -> None:
        self.reports.append((dict(metrics), copy.deepcopy(state)))

    def all_min(self, x):
        return x

    from_rank0 = all_min
