"""A static model: one vector per vocabulary token and no transformer. A text's vector is the
mean of its tokens' vectors (then normalised if the card says so): a table lookup, about 0.1 ms a
row on 2 CPU cores, most of it the tokenizer's. ``semvec distill`` makes one from any encoder.

The directory, written here and read here:

    model.safetensors        {"embedding.weight": float32 [vocab, dim]}  (StaticEmbedding's names)
    tokenizer.json           the base model's tokenizer, adding no special tokens, never truncating
    tokenizer_config.json    so that transformers' AutoTokenizer (the backfill's tokenize stage)
                             loads the same tokenizer
    modules.json, 1_Normalize/   sentence-transformers loads it as StaticEmbedding (+ Normalize)
    semvec.json              kind "static", pooling mean, normalize, base model and how it was made

A text is tokenized the way sentence-transformers' StaticEmbedding tokenizes it (no [CLS]/[SEP]),
so the two give the same vectors.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from semvec.config import Pooling
from semvec.models import (
    STATIC_KEY,
    STATIC_WEIGHTS,
    ModelCard,
    ModelKind,
    write_card,
    write_static_sentence_transformers_files,
)

# No position table, so no length limit of the model's own; this cap only bounds the tokenizer's
# work (a row is cut to max_chars characters before it anyway).
STATIC_MAX_LENGTH = 1_000_000


class StaticTable:
    """The token table of a static model, and how a row of token ids becomes a vector."""

    def __init__(self, vectors: np.ndarray | torch.Tensor):
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32).contiguous()  # [vocab, dim]
        self.dim = int(self.vectors.shape[1])

    @classmethod
    def load(cls, model_dir: Path) -> StaticTable:
        from safetensors.torch import load_file

        return cls(load_file(str(Path(model_dir) / STATIC_WEIGHTS))[STATIC_KEY])

    def to(self, device: torch.device) -> StaticTable:
        self.vectors = self.vectors.to(device)
        return self

    def encode(self, ids: list[np.ndarray], pooling: Pooling, normalize: bool,
               with_tokens: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Vectors float32 [n, dim] (a row without tokens: zeros, as StaticEmbedding gives);
        with_tokens adds each row's token vectors [n_tokens_i, dim]."""
        n = len(ids)
        if n == 0:
            return np.zeros((0, self.dim), np.float32), [] if with_tokens else None
        device = self.vectors.device
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long, device=device)
        flat = torch.from_numpy(np.concatenate(ids).astype(np.int64)).to(device)  # [total tokens]
        offsets = torch.cumsum(lengths, 0) - lengths  # [n]: where each row starts in flat
        pooled = self._pool(flat, offsets, lengths, pooling)  # [n, dim]
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        tokens = None
        if with_tokens:
            tokens = []
            for row in torch.split(self.vectors[flat], lengths.tolist()):  # [n_tokens_i, dim] each
                row = torch.nn.functional.normalize(row, p=2, dim=-1) if normalize else row
                tokens.append(row.cpu().numpy())
        return pooled.cpu().numpy(), tokens

    def _pool(self, flat, offsets, lengths, pooling: Pooling) -> torch.Tensor:
        # embedding_bag is what StaticEmbedding runs: same sums in the same order, and no
        # [tokens, dim] intermediate however long the rows are.
        if pooling in (Pooling.MEAN, Pooling.MAX):
            return torch.nn.functional.embedding_bag(flat, self.vectors, offsets,
                                                     mode=pooling.value)
        if pooling not in (Pooling.CLS, Pooling.LAST):
            raise ValueError(f"pooling {pooling!r} must be resolved before encoding")
        out = torch.zeros(len(lengths), self.dim, device=self.vectors.device)
        has = lengths > 0
        at = offsets if pooling == Pooling.CLS else offsets + lengths - 1  # first or last token
        out[has] = self.vectors[flat[at[has]]]
        return out


def static_tokenizer(tokenizer):
    """The base model's fast tokenizer as a static model needs it: no special tokens added (a
    token's own vector carries the text; [CLS] and [SEP] would weigh on every mean), and no
    truncation or padding (StaticEmbedding keeps whatever tokenizer.json says)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["truncation"], state["padding"] = None, None
    state["post_processor"] = _without_specials(state.get("post_processor"))
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   model_max_length=STATIC_MAX_LENGTH, **specials)


def _without_specials(processor: dict | None) -> dict | None:
    """A post-processor (tokenizer.json) less the steps that add special tokens; a byte-level
    step stays (it only fixes offsets)."""
    if not processor or processor.get("type") in ("TemplateProcessing", "BertProcessing",
                                                  "RobertaProcessing"):
        return None
    if processor.get("type") == "Sequence":
        kept = [q for q in map(_without_specials, processor.get("processors", [])) if q]
        return {**processor, "processors": kept} if kept else None
    return processor


def save_static(out: Path, vectors: np.ndarray, tokenizer, card: ModelCard) -> None:
    """Write a static model directory (see the module's docstring) into out (which exists)."""
    from safetensors.numpy import save_file

    out = Path(out)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(tokenizer):
        raise ValueError(f"a static table must be [vocab {len(tokenizer)}, dim], got {vectors.shape}")
    static_tokenizer(tokenizer).save_pretrained(str(out))
    _name_tokenizer_class(out)
    save_file({STATIC_KEY: vectors}, str(out / STATIC_WEIGHTS))
    write_static_sentence_transformers_files(out, card.normalize)
    write_card(out, replace(card, kind=ModelKind.STATIC, pooling=Pooling.MEAN.value,
                            max_length=STATIC_MAX_LENGTH))


def _name_tokenizer_class(out: Path) -> None:
    # transformers 5 writes its own class name (TokenizersBackend), which transformers 4 does not
    # know; PreTrainedTokenizerFast is the name both load tokenizer.json under, unchanged.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2))
