"""`semvec distill`: a static model made from any encoder, after model2vec's recipe.

    every vocabulary token alone through the model, between the tokenizer's special tokens
    ([SEP] tok [CLS] by default, see Frame), pooled as the model pools -> [vocab, hidden]
        -> PCA to dims -> each row weighted by its token's Zipf rank
        -> a static model directory (semvec.static): sentence-transformers loads it as
           StaticEmbedding, `semvec embed --model DIR` runs it with no transformer

The weight is SIF's a / (a + p), with p the token's probability estimated from its rank in the
vocabulary (Zipf: p proportional to 1 / rank). Vocabularies such as WordPiece's list their tokens
roughly by frequency, so the rank is the token's place in id order; frequent tokens weigh less in
a text's mean. BERT's reserved placeholders ([unused0] ...) are no tokens of any text: they take
no place in the ranks nor in the PCA fit, and their rows are zero.

The defaults (frame, zipf) were chosen on the STS-B dev split with the bundled model
(benchmarks/static.py prints the sweep; README.md has the numbers).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from semvec import crashpoints, models, storage
from semvec.config import load_settings, parse_enum
from semvec.errors import ConfigError

if TYPE_CHECKING:  # the encoder (torch) is imported when a distillation runs, not with its config
    from semvec.encode import Encoder

log = logging.getLogger("semvec.distill")


class Frame(str, Enum):
    """The special tokens around a token when it goes through the model alone."""

    SWAPPED = "swapped"  # [SEP] tok [CLS]: the closing ones first
    MODEL = "model"  # [CLS] tok [SEP]: as the tokenizer frames a text


DEFAULT_DIMS = 256
# Chosen on STS-B dev alone (bundled model, 256 dims; benchmarks/static.py): swapped
# framing beat model framing at every zipf tried (dev Spearman 0.8241 vs 0.7907 at 1e-4), and
# a = 1e-4 was best among 0, 1e-3, 3e-4, 1e-4, 3e-5 and 1e-5 (0.7942 .. 0.8241). Scaling each
# token's vector to length 1 before PCA lost at every zipf of a first sweep (0.7235 vs 0.7493 at
# 1e-4, model framing), so it is no option.
DEFAULT_FRAME = Frame.SWAPPED
DEFAULT_ZIPF = 1e-4
PLACEHOLDER = re.compile(r"\[unused\d+\]")  # BERT's reserved tokens: no text tokenizes to them
TOKENS_PER_STEP = 4096  # tokens a progress line covers


@dataclass
class DistillConfig:
    """One distillation: a static model directory from a model reference."""

    output: str
    model: str = "bundled"
    dims: int = DEFAULT_DIMS
    zipf: float = DEFAULT_ZIPF
    frame: Frame = DEFAULT_FRAME
    normalize: bool = True
    overwrite: bool = False
    batch_tokens: int | None = None

    HELP: ClassVar[dict[str, str]] = {
        "output": "the static model directory to write, local or s3://",
        "model": "the encoder to distil: bundled, a local Hugging Face directory, s3://bucket/prefix/, "
                 "models:/NAME/VERSION or models:/NAME@ALIAS",
        "dims": "vector size after PCA; at most the model's own",
        "zipf": "SIF coefficient a of the Zipf-rank weight a / (a + p); 0 turns the weighting off",
        "frame": "the special tokens around each token in its pass through the model: swapped "
                 "([SEP] tok [CLS], better on STS-B dev) or model ([CLS] tok [SEP], as a text has them)",
        "normalize": "L2-normalise the static model's text vectors (its modules.json says so too)",
        "overwrite": "replace an output that holds a semvec model (semvec.json), instead of refusing it",
        "batch_tokens": "padded tokens per forward pass of the token pass (default: the encoder's)",
    }

    def __post_init__(self) -> None:
        self.frame = parse_enum(Frame, "frame", self.frame)
        for name in ("output", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims < 1:
            raise ConfigError(f"dims must be a positive integer, got {self.dims!r}")
        if isinstance(self.zipf, bool) or not isinstance(self.zipf, (int, float)) or not self.zipf >= 0:
            raise ConfigError(f"zipf must be a number >= 0 (0: no weighting), got {self.zipf!r}")
        if self.batch_tokens is not None and (isinstance(self.batch_tokens, bool)
                                              or not isinstance(self.batch_tokens, int)
                                              or self.batch_tokens < 1):
            raise ConfigError(f"batch_tokens must be a positive integer, got {self.batch_tokens!r}")
        storage.filesystem(self.output)  # an unsupported scheme or credentials in it: refused here


def load_distill_config(**overrides: Any) -> DistillConfig:
    """A DistillConfig from settings (None means 'not given'); output is required."""
    return load_settings(DistillConfig, None, ("output",), overrides)


def distill(config: DistillConfig) -> dict:
    """Write the static model; returns the summary (vocabulary, dims, seconds, output)."""
    from semvec.static import save_static

    t0 = time.time()
    models.check_output(config.output, config.overwrite)
    model_dir = models.resolve_model(config.model)
    models.check_apart_from_model(config.output, config.model, model_dir)
    if models.model_kind(model_dir) == models.ModelKind.STATIC:
        raise ConfigError(f"model {storage.display(config.model)!r} is a static model already; "
                          "distil the encoder it came from")
    check_dims(config.dims, model_dir)
    encoder = base_encoder(model_dir, config.batch_tokens)
    live = ~placeholders(encoder.tokenizer)
    raw = token_vectors(encoder, config.frame, live)
    table = static_vectors(raw, live, config.dims, config.zipf)
    card = models.ModelCard(
        pooling="mean", normalize=config.normalize, max_length=0,
        base_model=storage.display(config.model), base_fingerprint=models.fingerprint(model_dir),
        method={"method": "distill", "dims": config.dims, "zipf": config.zipf,
                "frame": config.frame.value, "placeholders": int((~live).sum()),
                "base_pooling": encoder.pooling.value},
    )
    with tempfile.TemporaryDirectory(prefix="semvec-distill-") as tmp:
        save_static(Path(tmp), table, encoder.tokenizer, card)
        crashpoints.arm()
        models.publish(Path(tmp), config.output)
    return {"output": storage.display(config.output), "base_model": storage.display(config.model),
            "vocabulary": int(table.shape[0]), "dims": int(table.shape[1]),
            "seconds": round(time.time() - t0, 2)}


def base_encoder(model_dir: Path, batch_tokens: int | None = None) -> Encoder:
    """The encoder whose token vectors are distilled: unnormalised (PCA wants the raw geometry),
    with more rows a pass than for text (every input is three tokens long)."""
    from semvec.encode import Encoder

    encoder = Encoder(model_dir, normalize=False, batch_tokens=batch_tokens)
    encoder.max_rows = max(encoder.max_rows, 512)
    return encoder


def check_dims(dims: int, model_dir: Path) -> None:
    """dims fits the model (its hidden size, its vocabulary), read before any weight is loaded."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        hidden = int(AutoConfig.from_pretrained(str(model_dir)).hidden_size)
        vocab = len(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception as exc:  # noqa: BLE001 - whatever broke, the model is unusable
        raise ConfigError(f"model {str(model_dir)!r} cannot be loaded ({type(exc).__name__})") from None
    if dims > hidden:
        raise ConfigError(f"dims {dims} exceeds the model's {hidden} dimensions; allowed: 1 to {hidden}")
    if dims > vocab:
        raise ConfigError(f"dims {dims} exceeds the model's vocabulary of {vocab} tokens "
                          "(PCA has no more components)")


def placeholders(tokenizer) -> np.ndarray:
    """bool [vocab]: the tokens that are reserved placeholders (PLACEHOLDER), not pieces of text."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array([bool(PLACEHOLDER.fullmatch(str(name))) for name in names], dtype=bool)


def token_vectors(encoder: Encoder, frame: Frame = DEFAULT_FRAME,
                  live: np.ndarray | None = None) -> np.ndarray:
    """float32 [vocab, hidden]: each token id (of those live, default all) alone between the
    tokenizer's special tokens, pooled as the model pools; rows not live stay zero."""
    n = len(encoder.tokenizer)
    before, after = special_frame(encoder.tokenizer)
    if Frame(frame) == Frame.SWAPPED:
        before, after = after, before
    todo = np.flatnonzero(np.ones(n, dtype=bool) if live is None else live)
    out = np.zeros((n, encoder.dim), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(todo), TOKENS_PER_STEP):
        chunk = todo[start:start + TOKENS_PER_STEP]
        out[chunk] = encoder.encode_ids([np.asarray([*before, t, *after], dtype=np.int32) for t in chunk])[0]
        done = start + len(chunk)
        rate = done / max(time.time() - t0, 1e-9)
        log.info("distill: %s of %s tokens through the model (%.0f tokens/s, ~%.0f s left)",
                 f"{done:,}", f"{len(todo):,}", rate, (len(todo) - done) / rate)
    return out


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text ([CLS] and [SEP], <s> and
    </s>, nothing for GPT-2), read off a one-letter text: transformers 5's tokenizers no longer
    build them around given ids."""
    enc = tokenizer("a", return_special_tokens_mask=True, return_attention_mask=False)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    own = [i for i, s in enumerate(special) if not s]
    if not own:  # the probe became special tokens only: put the token after them
        return list(ids), []
    return list(ids[:own[0]]), list(ids[own[-1] + 1:])


def static_vectors(raw: np.ndarray, live: np.ndarray, dims: int, zipf: float) -> np.ndarray:
    """raw [vocab, hidden] -> float32 [vocab, dims]: PCA fitted on the live rows, then each live
    row weighted by its Zipf rank among the live tokens (zipf 0: unweighted); the rest zero."""
    x = pca(raw[live].astype(np.float64), dims)  # [live, dims]
    if zipf > 0:
        x *= zipf_weights(len(x), zipf)[:, None]
    out = np.zeros((len(raw), dims), dtype=np.float32)
    out[live] = x
    return out


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """x [n, d] centred and projected on its dims leading principal axes -> [n, dims].

    Eigenvectors of the d x d covariance (d is a model's hidden size, small); each axis's sign is
    fixed (largest loading positive) so a rerun writes the same table."""
    centred = x - x.mean(axis=0, keepdims=True)
    values, vectors = np.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))  # ascending
    axes = vectors[:, np.argsort(values)[::-1][:dims]]  # [d, dims]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    return centred @ (axes * np.where(signs == 0, 1.0, signs))


def zipf_weights(n: int, a: float) -> np.ndarray:
    """[n]: a / (a + p_r) for the token of rank r (1 .. n), p_r = (1 / r) / sum(1 / r)."""
    inverse = 1.0 / np.arange(1, n + 1, dtype=np.float64)
    return a / (a + inverse / inverse.sum())
