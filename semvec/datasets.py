"""Labelled datasets, read in one place for training, evaluation, retraining and benchmarks:
examples for one task from jsonl, csv, tsv, parquet or CoNLL files, and BEIR retrieval files; local
or s3://, each optionally gzip-compressed (``.gz``).

Each task has one example shape (see load_examples). Besides the generic formats with named columns,
the benchmark releases are read as published: the STS-B release (tab-separated, no header), CNSD
("id||sentence1||sentence2||score"), TREC label files ("COARSE:fine question", Latin-1), SentEval SST
("text<TAB>label", no header) and CoNLL-2003 columns in IOB1 or IOB2. The first bad row ends the load
with one line naming the file, the row and the problem.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from enum import Enum

import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.errors import ConfigError, choice_error

log = logging.getLogger("semvec.datasets")

class Task(str, Enum):
    STS = "sts"
    PAIRS = "pairs"
    CLASSIFICATION = "classification"
    NER = "ner"


# what `semvec evaluate` scores (the four kinds of data; retraining's suites are one of them)
class Kind(str, Enum):
    STS = "sts"
    RETRIEVAL = "retrieval"
    CLASSIFICATION = "classification"
    NER = "ner"


# the metric each kind is judged by (retraining's suites, the benchmarks)
METRIC = {Kind.STS: "spearman", Kind.RETRIEVAL: "ndcg@10", Kind.CLASSIFICATION: "accuracy", Kind.NER: "f1"}


class Examples(list):
    """A list of example dicts that remembers the file it came from, so later checks can name it."""

    def __init__(self, rows: Iterable[dict] = (), source: str = ""):
        super().__init__(rows)
        self.source = source


class _RowError(Exception):
    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row  # None: the row the loader is at



class _BlankText(_RowError):
    """A text field that is empty or only whitespace."""

# Accepted column names per example field; the first is the one errors name.
_COLUMNS = {
    Task.STS: {"sentence1": ("sentence1",), "sentence2": ("sentence2",),
               "score": ("score", "similarity_score", "label")},
    Task.PAIRS: {"anchor": ("anchor", "query"), "positive": ("positive",), "negative": ("negative",)},
    Task.CLASSIFICATION: {"text": ("text", "sentence", "text_a", "question"),
                          "label": ("label", "labels", "category", "intent")},
    Task.NER: {"tokens": ("tokens",), "tags": ("tags", "ner_tags")},
}
_OPTIONAL = {"negative"}
_TAG = re.compile(r"O|[BI]-\S+")
_TREC = re.compile(r"([A-Z]+):(\S+)\s+(.*)")


def load_examples(task: Task | str, uri: str, skip_blank: bool = False) -> list[dict]:
    """Read the examples of one task from a file.

    Shapes: sts {"sentence1", "sentence2", "score": float}; pairs {"anchor", "positive",
    "negative": str | None}; classification {"text", "label": str}; ner {"tokens", "tags"} with
    tags always IOB2 (IOB1 input is converted). The format follows the extension (.jsonl/.json,
    .csv and .tsv with a header, .parquet); ner reads any other file as CoNLL columns (token first,
    tag last); the benchmark layouts named above are recognised from their first line. Raises
    ConfigError (one line: file, row, problem) on a bad row, an empty file or an unknown task.
    `skip_blank`: a row with an empty text is left out and counted in a warning instead (past data,
    which training replays: kept from before such rows were refused).
    """
    task = _task(task)
    name = storage.display(uri)
    data = _read_bytes(uri, name)
    if not data.strip():
        raise ConfigError(f"{name} holds no examples")
    layout = _layout(task, uri, data, name)
    if layout == "parquet":
        rows: Iterator[tuple[int, dict]] = _parquet_rows(data, name)
    else:
        # Latin-1 only where the release is known to use it; elsewhere bad UTF-8 means a broken file.
        text = _decode(data, name, latin1=layout == "trec")
        rows = _READERS[layout](text)
    unit = "line" if layout == "conll" else "row"
    examples, n, blank = Examples(source=name), 0, 0
    try:
        for n, record in rows:  # noqa: B007 - n names the row in the error below
            try:
                examples.append(record if layout == "conll" else _example(task, record))
            except _BlankText:
                if not skip_blank:
                    raise
                blank += 1
    except _RowError as exc:
        raise ConfigError(f"{name} {unit} {exc.row or n}: {exc}") from None
    if blank:
        log.warning("%s: %d example(s) with an empty text left out", name, blank)
    if not examples:
        raise ConfigError(f"{name} holds no examples")
    return examples


def load_documents(uri: str) -> list[str]:
    """Documents to rank: jsonl records with "text" (and "title", put before it, as in a BEIR
    corpus), or txt, one a line; blank ones left out. ConfigError names the file and line."""
    name = storage.display(uri)
    text = _decode(_read_bytes(uri, name), name, latin1=False)
    if _name_without_gz(uri).endswith(".txt"):
        docs = [line.strip() for line in text.splitlines()]
    else:
        docs = []
        try:
            for n, record in _jsonl_rows(text):
                if "text" not in record:
                    raise _RowError("has no 'text'", n)
                docs.append((str(record.get("title") or "") + " " + str(record["text"] or "")).strip())
        except _RowError as exc:
            raise ConfigError(f"{name} line {exc.row}: {exc}") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ConfigError(f"{name} holds no documents")
    return docs


def read_beir(corpus: str, queries: str, qrels: str) -> tuple[dict, dict, dict]:
    """A BEIR layout: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and a
    qrels .tsv (query-id, corpus-id, score, with a header). Returns (doc id -> "title text", query
    id -> text for the judged queries, query id -> {doc id: score > 0}). Raises ConfigError naming
    the file and line of the first bad record."""
    def jsonl(uri: str, fields: tuple[str, ...]) -> list[dict]:
        name = storage.display(uri)
        rows = []
        try:
            for n, record in _jsonl_rows(_decode(_read_bytes(uri, name), name, latin1=False)):
                missing = [f for f in fields if f not in record]
                if missing:
                    raise _RowError(f"has no {missing[0]!r}", n)
                rows.append(record)
        except _RowError as exc:
            raise ConfigError(f"{name} line {exc.row}: {exc}") from None
        return rows

    records = jsonl(corpus, ("_id",))
    docs = {str(d["_id"]): (str(d.get("title") or "") + " " + str(d.get("text") or "")).strip()
            for d in records}
    if len(docs) < len(records):  # a dict keeps the last: said, as the backfill says its repeats
        example = next(i for i, n in Counter(str(d["_id"]) for d in records).items() if n > 1)
        log.warning("%s: %d document(s) repeat an _id another has (e.g. %r); the last of each is "
                    "scored", storage.display(corpus), len(records) - len(docs), example[:80])
    judged: dict[str, dict[str, int]] = {}
    name = storage.display(qrels)
    cells = _tab_cells(_decode(_read_bytes(qrels, name), name, latin1=False))
    try:
        for n, row in _headed_rows(cells):
            missing = [c for c in ("query-id", "corpus-id", "score") if c not in row]
            if missing:  # the first line is read as the header: a file without one lands here
                raise ConfigError(f"{name}: its first line, the header, has no {missing[0]!r} column "
                                  f"(it reads {list(row)!r}); BEIR qrels begin with the line "
                                  "query-id<TAB>corpus-id<TAB>score")
            try:
                score = int(row["score"])
                qid, doc = str(row["query-id"]), str(row["corpus-id"])
            except ValueError as exc:
                raise _RowError(f"needs query-id, corpus-id and an integer score ({exc})", n) from None
            if score > 0:
                judged.setdefault(qid, {})[doc] = score
    except _RowError as exc:
        raise ConfigError(f"{name} line {exc.row}: {exc}") from None
    qs = {str(q["_id"]): str(q["text"]) for q in jsonl(queries, ("_id", "text")) if str(q["_id"]) in judged}
    if not qs:
        raise ConfigError(f"no query in {storage.display(queries)} has a judgement in {name}")
    return docs, qs, judged


def label_set(train: list[dict], dev: list[dict], task: Task | str) -> list[str]:
    """Sorted labels of train (classification labels, or NER tags including "O"); [] for sts/pairs.

    For NER every entity type seen in train gets both B- and I- tags, since a type met only in
    one-token entities still needs I- for longer ones. Raises ConfigError naming the first dev label
    that train does not have.
    """
    task = _task(task)
    if task in (Task.STS, Task.PAIRS):
        return []
    seen = {lab for e in train for lab in example_labels(task, e)}
    if task is Task.NER:
        seen = {"O"} | {f"{p}-{t[2:]}" for t in seen if t != "O" for p in "BI"}
    source = getattr(dev, "source", "")
    for example in dev:
        for lab in example_labels(task, example):
            if lab not in seen:
                where = f" ({source})" if source else ""
                raise ConfigError(f"dev label {lab!r}{where} does not occur in train")
    return sorted(seen)


def example_labels(task: Task, example: dict) -> list[str]:
    """The labels an example teaches: its class, or its NER tags."""
    return [example["label"]] if task is Task.CLASSIFICATION else example["tags"]


def _task(task: Task | str) -> Task:
    try:
        return Task(task)
    except ValueError:
        raise choice_error("task", task, Task) from None


# ---------------------------------------------------------------- bytes, text, layout


def _read_bytes(uri: str, name: str) -> bytes:
    fs = storage.filesystem(uri)
    try:
        with fs.open(storage.strip(uri), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{name} cannot be read ({type(exc).__name__})") from None
    if not uri.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ConfigError(f"{name} is not a whole gzip file ({str(exc)[:120]})") from None


def _name_without_gz(uri: str) -> str:
    return uri[:-3] if uri.endswith(".gz") else uri


def _decode(data: bytes, name: str, latin1: bool) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if latin1:
            return data.decode("latin-1")
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{name} line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02X})") from None


def _layout(task: Task, uri: str, data: bytes, name: str) -> str:
    ext = posixpath.splitext(_name_without_gz(uri).replace("\\", "/").rsplit("/", 1)[-1])[1].lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    if task is Task.NER:
        return "conll"
    first = data[:65536].decode("utf-8-sig", "replace").lstrip().split("\n", 1)[0].rstrip("\r")
    names = {n for aliases in _COLUMNS[task].values() for n in aliases}
    headed = bool(names & {c.strip().strip('"') for c in re.split(r"[\t,]", first)})
    if task is Task.STS and not headed:
        if "||" in first:
            return "cnsd"
        if first.count("\t") >= 6:  # the release's .csv files are tab-separated, unquoted, headerless
            return "stsb"
    # Headerless layouts only without a .csv/.tsv extension: there a missing header is an error.
    if task is Task.CLASSIFICATION and not headed and ext not in (".csv", ".tsv"):
        if ext == ".label" or _TREC.fullmatch(first):
            return "trec"
        if first.count("\t") == 1:
            return "sst"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if headed:
        return "tsv" if "\t" in first else "csv"
    raise ConfigError(f"{name}: cannot tell its format for task {task.value}; "
                      "use .jsonl, .parquet, or .csv / .tsv with a header")


# ---------------------------------------------------------------- readers: (row, record)


def _numbered(text: str) -> Iterator[tuple[int, str]]:
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if line.strip():
            yield n, line


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict]]:
    for n, line in _numbered(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _RowError(f"not valid JSON ({exc.msg})", n) from None
        if not isinstance(record, dict):
            raise _RowError(f"expected a JSON object, got {type(record).__name__}", n)
        yield n, record


def _parquet_rows(data: bytes, name: str) -> Iterator[tuple[int, dict]]:
    try:
        return enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{name}: not a parquet file ({type(exc).__name__})") from None


def _csv_cells(text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for cells in reader:
            yield reader.line_num, cells  # line_num: the line the record ends on
    except csv.Error as exc:
        raise _RowError(f"not valid CSV ({exc})", reader.line_num) from None


def _tab_cells(text: str) -> Iterator[tuple[int, list[str]]]:
    # TSV is read unquoted (csv.QUOTE_NONE): quote characters inside texts are literal.
    for n, line in _numbered(text):
        yield n, line.split("\t")


def _headed_rows(cells: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, dict]]:
    header: list[str] | None = None
    for n, row in cells:
        if not any(c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            continue
        if len(row) != len(header):
            raise _RowError(f"expected {len(header)} columns, got {len(row)}", n)
        yield n, dict(zip(header, row, strict=True))


# Headerless release layouts: (separator, field count, example field -> cell index, what a row holds).
_FIXED = {
    # The STS-B release appends up to 2 source/licence fields to some rows, so 7 is a minimum.
    "stsb": ("\t", 7, {"score": 4, "sentence1": 5, "sentence2": 6},
             "7+ columns (genre, file, year, id, score, sentence1, sentence2)"),
    "cnsd": ("||", 4, {"sentence1": 1, "sentence2": 2, "score": 3},
             "4 '||'-separated fields (id, sentence1, sentence2, score)"),
    "sst": ("\t", 2, {"text": 0, "label": 1}, "2 columns (text, label)"),
}


def _fixed_rows(layout: str, text: str) -> Iterator[tuple[int, dict]]:
    sep, count, columns, what = _FIXED[layout]
    for n, line in _numbered(text):
        cells = line.split(sep)  # unquoted: quote characters inside texts are literal
        if len(cells) < count or (len(cells) > count and layout != "stsb"):
            raise _RowError(f"expected {what}, got {len(cells)}", n)
        record = {field: cells[i] for field, i in columns.items()}
        if layout == "sst":
            record["text"] = record["text"].strip()  # the release pads each text with a space
        yield n, record


def _trec_rows(text: str) -> Iterator[tuple[int, dict]]:
    for n, line in _numbered(text):
        match = _TREC.fullmatch(line.strip())
        if not match:
            raise _RowError("expected 'COARSE:fine question'", n)
        # The coarse label: the six TREC-6 classes everyone reports.
        yield n, {"text": match.group(3), "label": match.group(1)}


def _conll_rows(text: str) -> Iterator[tuple[int, dict]]:
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        cells = re.split(r"[ \t]+", line) if line else []
        if not cells or cells[0] == "-DOCSTART-":
            if tokens:
                yield start, {"tokens": tokens, "tags": _iob2(tags)}
            tokens, tags = [], []
            continue
        if len(cells) < 2:
            raise _RowError(f"expected 2+ columns, got {len(cells)}", n)
        _check_tag(cells[-1], n)
        start = start if tokens else n
        tokens.append(cells[0])
        tags.append(cells[-1])
    if tokens:
        yield start, {"tokens": tokens, "tags": _iob2(tags)}


_READERS = {
    "jsonl": _jsonl_rows, "csv": lambda t: _headed_rows(_csv_cells(t)),
    "tsv": lambda t: _headed_rows(_tab_cells(t)), "trec": _trec_rows, "conll": _conll_rows,
    **{layout: lambda t, layout=layout: _fixed_rows(layout, t) for layout in _FIXED},
}


# ---------------------------------------------------------------- records -> examples


def _example(task: Task, record: dict) -> dict:
    raw = {}
    for field, aliases in _COLUMNS[task].items():
        value = next((record[a] for a in aliases if a in record), None)
        if value is None and field not in _OPTIONAL:
            raise _RowError(f"missing field {field!r}")
        raw[field] = value
    if task is Task.STS:
        return {"sentence1": _text(raw, "sentence1"), "sentence2": _text(raw, "sentence2"),
                "score": _score(raw["score"])}
    if task is Task.PAIRS:
        # An empty csv/tsv cell is how a table says "no negative".
        blank = raw["negative"] is None or str(raw["negative"]).strip() == ""
        negative = None if blank else _text(raw, "negative")
        return {"anchor": _text(raw, "anchor"), "positive": _text(raw, "positive"), "negative": negative}
    if task is Task.CLASSIFICATION:
        return {"text": _text(raw, "text"), "label": _label(raw["label"])}
    tokens, tags = raw["tokens"], raw["tags"]
    for field, seq in (("tokens", tokens), ("tags", tags)):
        if not isinstance(seq, list) or not all(isinstance(t, str) for t in seq):
            raise _RowError(f"field {field!r} is not a list of strings")
    if len(tokens) != len(tags):
        raise _RowError(f"{len(tokens)} tokens but {len(tags)} tags")
    for tag in tags:
        _check_tag(tag)
    return {"tokens": tokens, "tags": _iob2(tags)}


def _text(raw: dict, field: str) -> str:
    value = raw[field]
    if not isinstance(value, str):
        raise _RowError(f"field {field!r} is {type(value).__name__}, not text")
    if not value.strip():  # embed quarantines such a row (empty_text); a label for it teaches nothing
        raise _BlankText(f"field {field!r} is empty")
    return value


def _score(value: object) -> float:
    try:
        score = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise _RowError(f"score {value!r} is not a number")
    return score


def _label(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 from a float column is the label "1", as in a text file
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _RowError(f"label {value!r} is not a string or number")
    label = str(value).strip()
    if not label:
        raise _RowError("empty label")
    return label


def _check_tag(tag: str, row: int | None = None) -> None:
    if not _TAG.fullmatch(tag):
        raise _RowError(f"tag {tag!r} is not O, B-TYPE or I-TYPE", row)


def _iob2(tags: list[str]) -> list[str]:
    # IOB1 opens an entity with I- (B- only between two touching entities of one type); IOB2 always
    # with B-. Rewriting an I- that does not continue its own type is therefore a no-op on IOB2.
    out: list[str] = []
    for tag in tags:
        if tag.startswith("I-") and (not out or out[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out
