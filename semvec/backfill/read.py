"""Read stage: corpus files -> rows, each either valid text or a quarantine reason.

Parsing is done here rather than with Ray Data's built-in readers because every row must be
accounted for: a malformed line, a bad byte or a missing field becomes a row with a reason, and
every row carries its source file and row number. Files are read as streams, in chunks, so a
billion-row file never sits in memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from enum import Enum

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.config import InputFormat
from semvec.storage import InputFile

RAW_LIMIT = 1000  # characters of a bad row kept in quarantine

ROW_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("row", pa.int64()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("reason", pa.string()),  # null: embed it; else why it goes to quarantine
    ("raw", pa.string()),
])


class Reason(str, Enum):
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_FIELD = "missing_text_field"
    MISSING_ID = "missing_id"
    NON_STRING = "non_string_text"
    EMPTY = "empty_text"
    TOO_LONG = "text_too_long"
    BAD_COLUMNS = "wrong_number_of_columns"
    UNREADABLE_FILE = "unreadable_file"
    ENCODE_FAILED = "encode_failed"


_EXTENSIONS = {
    ".jsonl": InputFormat.JSONL, ".json": InputFormat.JSONL, ".ndjson": InputFormat.JSONL,
    ".parquet": InputFormat.PARQUET, ".pq": InputFormat.PARQUET,
    ".csv": InputFormat.CSV, ".tsv": InputFormat.TSV, ".txt": InputFormat.TXT,
}


def detect_format(relative: str, given: InputFormat) -> InputFormat | None:
    """The file's format from its name (after any .gz), or the one given; None if unknown."""
    if given != InputFormat.AUTO:
        return given
    name = relative.lower().removesuffix(".gz")
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


class RowParser:
    """Turns one file's records into (row, id, text, reason, raw) tuples."""

    def __init__(self, text_field: str, id_field: str | None, max_chars: int):
        self.text_field = text_field
        self.id_field = id_field
        self.max_chars = max_chars

    def check(self, source: str, row: int, record, raw) -> tuple:
        """Validate one parsed record (a mapping) into the output tuple."""
        if not isinstance(record, dict):
            return self.bad(row, Reason.NOT_AN_OBJECT, raw)
        if self.text_field not in record:
            return self.bad(row, Reason.MISSING_FIELD, raw)
        rid = f"{source}:{row}"
        if self.id_field is not None:
            value = record.get(self.id_field)
            if value is None:
                return self.bad(row, Reason.MISSING_ID, raw)
            rid = str(value)
        return self.check_text(row, rid, record[self.text_field], raw)

    def check_text(self, row: int, rid: str, text, raw) -> tuple:
        if text is None or (isinstance(text, str) and not text.strip()):
            return self.bad(row, Reason.EMPTY, raw, rid)
        if not isinstance(text, str):
            return self.bad(row, Reason.NON_STRING, raw, rid)
        if len(text) > self.max_chars:
            return self.bad(row, Reason.TOO_LONG, raw, rid)
        return (row, rid, text, None, None)

    @staticmethod
    def bad(row: int, reason: Reason, raw, rid: str | None = None) -> tuple:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="backslashreplace")
        elif not isinstance(raw, str):
            raw = json.dumps(raw, default=str, ensure_ascii=False)
        return (row, rid, None, reason.value, raw[:RAW_LIMIT])


def _open(fs, file: InputFile) -> io.BufferedIOBase:
    handle = fs.open(storage.strip(file.uri) if storage.is_remote(file.uri) else file.uri, "rb")
    if file.relative.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=handle)
    return handle


def _lines(handle) -> Iterator[tuple[int, bytes]]:
    for row, line in enumerate(handle):
        yield row, line.rstrip(b"\r\n")


def parse_jsonl(handle, source: str, p: RowParser) -> Iterator[tuple]:
    for row, line in _lines(handle):
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError:
            yield p.bad(row, Reason.INVALID_UTF8, line)
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError:
            yield p.bad(row, Reason.MALFORMED_JSON, decoded)
            continue
        yield p.check(source, row, record, decoded)


def parse_txt(handle, source: str, p: RowParser) -> Iterator[tuple]:
    for row, line in _lines(handle):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield p.bad(row, Reason.INVALID_UTF8, line)
            continue
        yield p.check_text(row, f"{source}:{row}", text, text)


def parse_delimited(handle, source: str, p: RowParser, delimiter: str) -> Iterator[tuple]:
    # surrogateescape keeps bad bytes as lone surrogates so one bad row doesn't end the file.
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    for row, values in enumerate(reader):
        raw = delimiter.join(values)
        if _has_surrogates(raw):
            yield p.bad(row, Reason.INVALID_UTF8, raw.encode("utf-8", "surrogateescape"))
        elif len(values) != len(header):
            yield p.bad(row, Reason.BAD_COLUMNS, raw)
        else:
            yield p.check(source, row, dict(zip(header, values, strict=True)), raw)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def parse_parquet(handle, source: str, p: RowParser) -> Iterator[tuple]:
    pf = pq.ParquetFile(handle)
    if p.text_field not in pf.schema_arrow.names:
        for row in range(pf.metadata.num_rows):
            yield p.bad(row, Reason.MISSING_FIELD, f"columns: {pf.schema_arrow.names}")
        return
    columns = [p.text_field] + ([p.id_field] if p.id_field else [])
    columns = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        for record in batch.to_pylist():
            yield p.check(source, row, record, record)
            row += 1


def iter_rows(file: InputFile, fmt: InputFormat, parser: RowParser) -> Iterator[tuple]:
    fs = storage.filesystem(file.uri)
    with _open(fs, file) as handle:
        if fmt == InputFormat.JSONL:
            yield from parse_jsonl(handle, file.relative, parser)
        elif fmt == InputFormat.TXT:
            yield from parse_txt(handle, file.relative, parser)
        elif fmt in (InputFormat.CSV, InputFormat.TSV):
            yield from parse_delimited(
                handle, file.relative, parser, "\t" if fmt == InputFormat.TSV else ","
            )
        elif fmt == InputFormat.PARQUET:
            yield from parse_parquet(handle, file.relative, parser)
        else:
            raise ValueError(f"no parser for {fmt}")


def read_file_chunks(
    file: InputFile,
    fmt: InputFormat,
    parser: RowParser,
    done_rows: np.ndarray,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """Yield ROW_SCHEMA tables of at most chunk_rows rows, leaving out rows already done."""
    done = set(done_rows.tolist())
    buf: list[tuple] = []
    next_row = 0
    try:
        for item in iter_rows(file, fmt, parser):
            next_row = item[0] + 1
            if item[0] in done:
                continue
            buf.append(item)
            if len(buf) >= chunk_rows:
                yield _table(file.relative, buf)
                buf = []
    except (OSError, EOFError, gzip.BadGzipFile, pa.ArrowInvalid) as exc:
        # A truncated gzip or a broken parquet footer: what was read stands; the rest of the
        # file is one quarantine row that says why (its row number is where reading stopped).
        if next_row not in done:
            reason = f"{type(exc).__name__}: {exc}"
            buf.append(RowParser.bad(next_row, Reason.UNREADABLE_FILE, reason))
    if buf:
        yield _table(file.relative, buf)


def _table(source: str, rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.table(
        [pa.array([source] * len(rows), pa.string())]
        + [pa.array(c, t) for c, t in zip(cols, ROW_SCHEMA.types[1:], strict=True)],
        schema=ROW_SCHEMA,
    )
