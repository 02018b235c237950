"""Long documents as token windows: the window maths, pure functions over token arrays.

A text is tokenized whole (no truncation: the reader already bounds it by max_chars), its content
tokens (the model's special tokens set apart) are cut into windows of `size` tokens that overlap
by `overlap`, and each window is wrapped in the same special tokens the model puts around a text.
A window's character span runs from its first token's start offset to its last token's end
offset, so `text[start:end]` is the text the window saw.

    content tokens   t0 t1 t2 t3 t4 t5 t6 t7 t8         size 4, overlap 1: stride 3
    windows          [t0 .. t3] [t3 .. t6] [t6 .. t8]   the last one may be shorter

A document's vector from its chunks (``--aggregate mean``) is the token-weighted mean of the chunk
vectors, v = sum_c n_c v_c / sum_c n_c (n_c: the chunk's content tokens), renormalised to unit
length when the chunk vectors are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semvec.errors import ConfigError


def windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges over n content tokens; together they cover 0 .. n.

    Every window but the last holds `size` tokens and shares `overlap` with the next; a text that
    fits in one window (or has no content token at all) is one window."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"windows need size >= 1 and 0 <= overlap < size, got {size} and {overlap}")
    stride = size - overlap
    out, start = [], 0
    while True:
        end = min(start + size, n)
        out.append((start, end))
        if end >= n:
            return out
        start += stride


@dataclass
class Chunks:
    """One text's windows: token ids with the special tokens, character spans, content tokens."""

    ids: list[np.ndarray]  # each int32 [n_tokens_c], specials included
    spans: np.ndarray  # int32 [n_chunks, 2]: start, end character offsets into the text
    content: np.ndarray  # int32 [n_chunks]: content tokens per chunk (the weights of the mean)
    tokens: int  # the whole text's tokens, specials included (what an untruncated row would hold)


def split(ids: np.ndarray, special: np.ndarray, offsets: np.ndarray, chunk_tokens: int,
          overlap: int) -> Chunks:
    """One text's full tokenization (ids [t], special-token mask [t], offsets [t, 2]) -> its chunks
    of at most chunk_tokens tokens each, specials included.

    The specials before the first content token and after the last wrap every window, as the
    model's tokenizer wraps a whole text (BERT: [CLS] ... [SEP]; GPT-2: nothing)."""
    real = np.flatnonzero(~special)
    lead = int(real[0]) if len(real) else len(ids)
    tail = int(real[-1]) + 1 if len(real) else len(ids)
    prefix, suffix = ids[:lead], ids[tail:]
    content, spans_of = ids[lead:tail], offsets[lead:tail]
    size = chunk_tokens - len(prefix) - len(suffix)
    out_ids, spans, counts = [], [], []
    for a, b in windows(len(content), size, overlap):
        out_ids.append(np.concatenate([prefix, content[a:b], suffix]).astype(np.int32))
        spans.append((int(spans_of[a, 0]), int(spans_of[b - 1, 1])) if b > a else (0, 0))
        counts.append(b - a)
    return Chunks(out_ids, np.asarray(spans, dtype=np.int32).reshape(-1, 2),
                  np.asarray(counts, dtype=np.int32), len(ids))


def special_tokens(tok) -> int:
    """How many special tokens the tokenizer puts around one text (BERT 2, GPT-2 0)."""
    return len(tok("x")["input_ids"]) - len(tok("x", add_special_tokens=False)["input_ids"])


def check_windows(tok, chunk_tokens: int, overlap: int, max_length: int) -> int:
    """The content tokens per window, or a one-line ConfigError for settings the model cannot take."""
    if chunk_tokens > max_length:
        raise ConfigError(f"chunk_tokens {chunk_tokens} exceeds max_length {max_length} (--max-length, "
                          "else the model's own); "
                          f"allowed: {special_tokens(tok) + 1} to {max_length}")
    size = chunk_tokens - special_tokens(tok)
    if size < 1:
        raise ConfigError(f"chunk_tokens {chunk_tokens} leaves no room for text beside the model's "
                          f"{special_tokens(tok)} special tokens")
    if not 0 <= overlap < size:
        raise ConfigError(f"chunk_overlap {overlap} must be from 0 to {size - 1} (the {size} text "
                          f"tokens of a {chunk_tokens}-token window, less one)")
    return size


def tokenize_whole(tok, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, special mask, offsets) per text, nothing truncated."""
    if not texts:
        return []
    enc = tok(texts, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True,
              return_attention_mask=False, verbose=False)
    return [(np.asarray(i, dtype=np.int32), np.asarray(s, dtype=bool),
             np.asarray(o, dtype=np.int32).reshape(-1, 2))
            for i, s, o in zip(enc["input_ids"], enc["special_tokens_mask"], enc["offset_mapping"],
                               strict=True)]


def weighted_mean(vectors: np.ndarray, content: np.ndarray, normalize: bool) -> np.ndarray:
    """A document's vector from its chunk vectors [n_chunks, dim]: sum_c n_c v_c / sum_c n_c,
    at unit length when normalize (as the chunk vectors are)."""
    weights = content.astype(np.float64)
    if weights.sum() <= 0:  # one chunk without content tokens: nothing to weigh
        weights = np.ones_like(weights)
    v = (weights[:, None] * vectors.astype(np.float64)).sum(0) / weights.sum()
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return v.astype(np.float32)
