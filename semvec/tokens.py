"""Tokenizing without importing transformers or torch, for the backfill's planning and its
tokenize tasks: each such process would otherwise spend about 2 CPU-seconds importing them.

transformers' fast tokenizer is a `tokenizers.Tokenizer` (the Rust backend) plus settings it
applies per call (truncation, padding). The backend is not always tokenizer.json as stored: a
tokenizer class may rebuild its normalizer, pre-tokenizer or post-processor from its config. So
the backend is taken from transformers itself, once per model: `describe()` loads the model's
config and tokenizer with transformers (which also checks that they load), serializes the backend
as transformers built it, and caches that, with the truncation side and the model's width, under
the semvec cache by the model's fingerprint and the library versions. Later plans read the cache;
workers get the serialized backend with their task and rebuild it in milliseconds
(`FastTokenizer`). A tokenizer that is not a fast one, one that splits special tokens written in
the text (split_special_tokens), or remote code, gets no backend: its users
load transformers' tokenizer (`load_tokenizer`) as before. tests/test_tokens.py holds the two to
the same output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from semvec.errors import ConfigError

log = logging.getLogger("semvec.tokens")


@dataclass
class Tokenized:
    """Token ids per row (no padding), and what truncation did."""

    ids: list[np.ndarray]  # each int32 [n_tokens_i]
    truncated: np.ndarray  # bool [n_rows]
    special: list[np.ndarray] | None = None  # bool [n_tokens_i], token mode only
    offsets: list[np.ndarray] | None = None  # int32 [n_tokens_i, 2], token mode only


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs from loading a model once."""

    dim: int  # the vectors' width
    # transformers' tokenizer backend, serialized (None: load transformers'); hundreds of KB, so
    # equality and hashing look at its digest instead (tokenize tasks cache tokenizers by facts)
    backend: str | None = field(compare=False)
    truncation_side: str = "right"
    digest: str = field(init=False, default="")  # sha256 of backend

    def __post_init__(self):
        object.__setattr__(self, "digest", hashlib.sha256(self.backend.encode()).hexdigest()
                           if self.backend else "")

    def tokenizer(self, model_dir: Path, trust_remote_code: bool = False):
        """The tokenizer without transformers when there is a backend; transformers' where there is
        none, or where this process's `tokenizers` cannot read it (a cluster worker with another
        version than the driver that serialized it)."""
        if self.backend:
            try:
                return FastTokenizer(self.backend, self.truncation_side)
            except Exception as exc:  # noqa: BLE001 - any failure to read it: transformers' way
                log.warning("the serialized tokenizer does not load here (%s: %s); using transformers'",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return load_tokenizer(model_dir, trust_remote_code)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """transformers' tokenizer for the model (imports transformers and torch)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # GPT-style tokenizers: padding is masked out, any id will do
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def describe(model_dir: Path, fingerprint: str, ref: str, static_dim: int | None = None,
             trust_remote_code: bool = False) -> ModelFacts:
    """The model's ModelFacts, from the cache when this model was described before; otherwise
    loaded with transformers: a model that does not load is a one-line ConfigError naming `ref`
    (as the user gave it). static_dim: a static model's width (it has no config.json)."""
    from semvec.models import cache_root

    path = None if trust_remote_code else cache_root() / "tokenizers" / f"{_key(fingerprint)}.json"
    if path is not None and path.is_file():
        try:
            return ModelFacts(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # unreadable: described again
            log.debug("ignoring the cached description %s (%s)", path, exc)
    facts = _load(model_dir, ref, static_dim, trust_remote_code)
    if path is not None:
        _save(path, facts)
    return facts


def _key(fingerprint: str) -> str:
    return f"{fingerprint}-transformers{version('transformers')}-tokenizers{version('tokenizers')}"


def _load(model_dir: Path, ref: str, static_dim: int | None, trust_remote_code: bool) -> ModelFacts:
    try:
        if static_dim is None:
            from transformers import AutoConfig

            dim = int(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
                      .hidden_size)
        else:
            dim = static_dim
        tok = load_tokenizer(model_dir, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the model is unusable
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ConfigError(f"model {ref!r} cannot be loaded ({type(exc).__name__}: {first})") from None
    # split_special_tokens is a setting transformers applies per call, not part of the backend
    fast = (getattr(tok, "is_fast", False) and not trust_remote_code
            and not getattr(tok, "split_special_tokens", False))
    return ModelFacts(dim, tok.backend_tokenizer.to_str() if fast else None,
                      str(getattr(tok, "truncation_side", "right")))


def _save(path: Path, facts: ModelFacts) -> None:
    """Written whole or not at all (a temporary file renamed); a cache that cannot be written is
    only slower next time."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"dim": facts.dim, "backend": facts.backend,
                                   "truncation_side": facts.truncation_side}))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("the model description was not cached at %s (%s)", path, exc)
        tmp.unlink(missing_ok=True)


class FastTokenizer:
    """transformers' fast tokenizer for the calls semvec makes of it (`tokenize`,
    chunking.tokenize_whole, chunking.special_tokens, convert_ids_to_tokens), without transformers:
    the same backend, set for each call as transformers sets it."""

    def __init__(self, backend: str, truncation_side: str = "right"):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend)
        self.backend.no_padding()
        self.truncation_side = truncation_side
        self._truncation: int | None = -1  # what the backend is set to (-1: not set yet)

    def __call__(self, texts, truncation: bool = False, max_length: int | None = None,
                 return_overflowing_tokens: bool = False, return_offsets_mapping: bool = False,
                 return_special_tokens_mask: bool = False, return_attention_mask: bool = True,
                 add_special_tokens: bool = True, verbose: bool = True) -> dict:
        single = isinstance(texts, str)
        self._truncate(max_length if truncation else None)
        encodings = self.backend.encode_batch([texts] if single else list(texts),
                                              add_special_tokens=add_special_tokens)
        rows, mapping = [], []
        for i, enc in enumerate(encodings):
            for piece in [enc, *(enc.overflowing if return_overflowing_tokens else [])]:
                rows.append(piece)
                mapping.append(i)
        out = {"input_ids": [r.ids for r in rows]}
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = mapping
        if return_offsets_mapping:
            out["offset_mapping"] = [r.offsets for r in rows]
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [r.special_tokens_mask for r in rows]
        if return_attention_mask:
            out["attention_mask"] = [r.attention_mask for r in rows]
        if single and not return_overflowing_tokens:
            out = {k: v[0] for k, v in out.items()}
        return out

    def _truncate(self, max_length: int | None) -> None:
        if max_length == self._truncation:
            return
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                           direction=self.truncation_side)
        self._truncation = max_length

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]


def tokenize(tok, texts: list[str], max_length: int, with_offsets: bool = False) -> Tokenized:
    """Tokenize with truncation to max_length; a row is 'truncated' when tokens were cut.
    tok: transformers' tokenizer or a FastTokenizer."""
    if not texts:  # a batch whose every row went to quarantine (tokenizers refuse an empty list)
        empty = [] if with_offsets else None
        return Tokenized(ids=[], truncated=np.zeros(0, dtype=bool), special=empty, offsets=empty)
    enc = tok(
        texts,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,  # tells us which rows lost tokens
        return_offsets_mapping=with_offsets,
        return_special_tokens_mask=with_offsets,
        return_attention_mask=False,
    )
    mapping = enc.get("overflow_to_sample_mapping")
    if mapping is None:  # a slow tokenizer returns no overflow: count the untruncated tokens instead
        full = tok(texts, truncation=False, return_attention_mask=False)["input_ids"]
        ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
        return _with_offsets(Tokenized(ids=ids, truncated=np.array([len(f) > max_length for f in full])),
                             enc, list(range(len(texts))), with_offsets)
    first: dict[int, int] = {}
    counts = np.zeros(len(texts), dtype=np.int64)
    for pos, row in enumerate(mapping):
        counts[row] += 1
        first.setdefault(row, pos)
    order = [first[i] for i in range(len(texts))]
    ids = [np.asarray(enc["input_ids"][p], dtype=np.int32) for p in order]
    return _with_offsets(Tokenized(ids=ids, truncated=counts > 1), enc, order, with_offsets)


def _with_offsets(out: Tokenized, enc, order: list[int], with_offsets: bool) -> Tokenized:
    if with_offsets:
        out.offsets = [np.asarray(enc["offset_mapping"][p], dtype=np.int32).reshape(-1, 2) for p in order]
        out.special = [np.asarray(enc["special_tokens_mask"][p], dtype=bool) for p in order]
    return out
