"""`semvec words`: one vector per whole word of a word list, from a model or a static model.

A word is encoded alone, as a one-word text: a transformer runs it with its special tokens and
pools its sub-word pieces as the model pools; a static model takes the mean of its pieces'
vectors. Either way it is the vector `semvec embed` gives a row holding that word.

Output, local or s3://:
- word2vec: the text format gensim's ``KeyedVectors.load_word2vec_format`` reads (a header
  "<words> <dim>", then a word and its numbers a line); a word may hold no whitespace there.
- parquet: columns word (string), embedding (fixed_size_list<float32>[dim]), n_pieces (int32).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from semvec import crashpoints, models, storage
from semvec.config import load_settings, parse_enum
from semvec.errors import ConfigError

if TYPE_CHECKING:  # the encoder (torch) is imported when an export runs, not with its config
    from semvec.encode import Encoder

log = logging.getLogger("semvec.words")

WORDS_PER_STEP = 8192  # words a progress line covers


class WordFormat(str, Enum):
    WORD2VEC = "word2vec"
    PARQUET = "parquet"


@dataclass
class WordsConfig:
    """One word-vector export."""

    vocab: str
    output: str
    model: str = "bundled"
    format: WordFormat = WordFormat.WORD2VEC
    overwrite: bool = False
    batch_tokens: int | None = None

    HELP: ClassVar[dict[str, str]] = {
        "vocab": "the word list, local or s3://: UTF-8, one word a line; blank lines are skipped "
                 "and a repeated word is kept once (both reported)",
        "output": "the file to write, local or s3://",
        "model": "bundled, a static model from semvec distill, a local Hugging Face directory, "
                 "s3://bucket/prefix/, models:/NAME/VERSION or models:/NAME@ALIAS",
        "format": "word2vec: the text format gensim reads; parquet: word, embedding, n_pieces",
        "overwrite": "replace an output file that exists, instead of refusing it",
        "batch_tokens": "padded tokens per forward pass (default: the encoder's)",
    }

    def __post_init__(self) -> None:
        self.format = parse_enum(WordFormat, "format", self.format)
        for name in ("vocab", "output", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.batch_tokens is not None and (isinstance(self.batch_tokens, bool)
                                              or not isinstance(self.batch_tokens, int)
                                              or self.batch_tokens < 1):
            raise ConfigError(f"batch_tokens must be a positive integer, got {self.batch_tokens!r}")
        storage.filesystem(self.output)  # an unsupported scheme or credentials in it: refused here


def load_words_config(**overrides: Any) -> WordsConfig:
    """A WordsConfig from settings (None means 'not given'); vocab and output are required."""
    return load_settings(WordsConfig, None, ("vocab", "output"), overrides)


@dataclass
class WordList:
    """The distinct words of a word list, in file order, and what was left out."""

    words: list[str]
    line_of: list[int]  # the 1-based line each word was read from
    lines: int
    blank: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # word -> lines it repeated on


def read_word_list(uri: str) -> WordList:
    """One word a line (surrounding whitespace dropped); raises ConfigError for a missing file,
    text that is not UTF-8, or a list without a word."""
    fs = storage.filesystem(uri)
    try:
        raw = fs.cat_file(storage.strip(uri))
    except FileNotFoundError:
        raise ConfigError(f"vocab {storage.display(uri)!r} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - unreadable is unreadable, whatever the store says
        raise ConfigError(f"vocab {storage.display(uri)!r} cannot be read ({type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first word
    except UnicodeDecodeError as exc:
        raise ConfigError(f"vocab {storage.display(uri)!r} is not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    out = WordList(words=[], line_of=[], lines=len(lines))
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        word = line.strip()
        if not word:
            out.blank += 1
        elif word in seen:
            out.duplicates[word] = out.duplicates.get(word, 0) + 1
        else:
            seen.add(word)
            out.words.append(word)
            out.line_of.append(number)
    if not out.words:
        raise ConfigError(f"vocab {storage.display(uri)!r} holds no words ({out.lines} lines, "
                          f"{out.blank} blank)")
    return out


def check_format(words: WordList, fmt: WordFormat, uri: str) -> None:
    """word2vec's text format separates a word from its numbers by a space: a word holding
    whitespace cannot be written there."""
    if fmt != WordFormat.WORD2VEC:
        return
    for word, number in zip(words.words, words.line_of, strict=True):
        if any(c.isspace() for c in word):
            raise ConfigError(f"vocab {storage.display(uri)!r} line {number} holds {word[:80]!r}, with "
                              "whitespace inside: the word2vec format cannot hold it; join it (e.g. "
                              "with _) or use --format parquet")


def word_vectors(encoder: Encoder, words: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors float32 [n, dim], sub-word pieces per word int32 [n], unknown bool [n]: every
    piece is the unknown token). Pieces are the tokens less the model's special tokens."""
    unk = encoder.tokenizer.unk_token_id
    vectors = np.zeros((len(words), encoder.dim), dtype=np.float32)
    pieces = np.zeros(len(words), dtype=np.int32)
    unknown = np.zeros(len(words), dtype=bool)
    t0 = time.time()
    for start in range(0, len(words), WORDS_PER_STEP):
        chunk = words[start:start + WORDS_PER_STEP]
        tk = encoder.tokenize(chunk, with_offsets=True)  # with_offsets: the special-token masks too
        vectors[start:start + len(chunk)] = encoder.encode_ids(tk.ids)[0]
        for j, (ids, special) in enumerate(zip(tk.ids, tk.special, strict=True)):
            own = ids[~special]
            pieces[start + j] = len(own)
            unknown[start + j] = len(own) > 0 and unk is not None and bool(np.all(own == unk))
        if len(words) > WORDS_PER_STEP:
            done = start + len(chunk)
            log.info("words: %s of %s (%.0f words/s)", f"{done:,}", f"{len(words):,}",
                     done / max(time.time() - t0, 1e-9))
    return vectors, pieces, unknown


def word2vec_bytes(words: list[str], vectors: np.ndarray) -> bytes:
    """The word2vec text format: "<n> <dim>\\n", then "<word> <x1> ... <xdim>\\n" per word."""
    buf = io.StringIO()
    buf.write(f"{len(words)} {vectors.shape[1]}\n")
    numbers = io.StringIO()
    np.savetxt(numbers, vectors, fmt="%.7g", delimiter=" ")  # 7 significant digits: float32's
    for word, line in zip(words, numbers.getvalue().splitlines(), strict=True):
        buf.write(f"{word} {line}\n")
    return buf.getvalue().encode("utf-8")


def parquet_bytes(words: list[str], vectors: np.ndarray, pieces: np.ndarray) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    table = pa.table({
        "word": pa.array(words, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        "n_pieces": pa.array(pieces, pa.int32()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def export_words(config: WordsConfig) -> dict:
    """Read the list, check it and the output, encode every word, write the file; the summary."""
    from semvec.encode import Encoder

    t0 = time.time()
    words = read_word_list(config.vocab)
    check_format(words, config.format, config.vocab)
    storage.check_file_writable(config.output, overwrite=config.overwrite)
    model_dir = models.resolve_model(config.model)
    encoder = Encoder(model_dir, batch_tokens=config.batch_tokens)
    _report(words, config.vocab)
    vectors, pieces, unknown = word_vectors(encoder, words.words)
    if not pieces.all():
        empty = [w for w, n in zip(words.words, pieces, strict=True) if n == 0]
        log.warning("vocab %s: %d word(s) have no piece in this model's vocabulary (e.g. %r): their "
                    "vectors carry no meaning (a static model's is zero, a transformer's pools only "
                    "its special tokens); n_pieces is 0 in parquet", storage.display(config.vocab),
                    len(empty), empty[0][:80])
    data = (word2vec_bytes(words.words, vectors) if config.format == WordFormat.WORD2VEC
            else parquet_bytes(words.words, vectors, pieces))
    fs = storage.filesystem(config.output)
    crashpoints.arm()
    storage.write_atomic(fs, storage.strip(config.output), data)
    return {"output": storage.display(config.output), "format": config.format.value,
            "kind": models.model_kind(model_dir).value, "words": len(words.words),
            "dim": encoder.dim, "lines": words.lines, "blank_lines": words.blank,
            "duplicates": sum(words.duplicates.values()), "unknown": int(unknown.sum()),
            "no_pieces": int((pieces == 0).sum()), "seconds": round(time.time() - t0, 2)}


def _report(words: WordList, uri: str) -> None:
    if words.blank:
        log.info("vocab %s: %d blank line(s) skipped", storage.display(uri), words.blank)
    if words.duplicates:
        example = next(iter(words.duplicates))
        log.warning("vocab %s: %d repeated line(s) of %d word(s) kept once (e.g. %r)",
                    storage.display(uri), sum(words.duplicates.values()), len(words.duplicates),
                    example[:80])
