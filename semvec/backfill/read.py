"""Read stage: corpus files -> rows, each either valid text or a quarantine reason.

Parsing is done here rather than with Ray Data's built-in readers because every row must be
accounted for: a malformed line, a bad byte or a missing field becomes a row with a reason, and
every row carries its source file and row number. Files are read as streams, in chunks, so a
billion-row file never sits in memory.

What no input can do is stop the job. A row whose text or id is not valid Unicode (a bad byte, or
a lone surrogate such as JSON's "\ud800", which UTF-8 cannot hold) is `invalid_utf8`; a row that
no column could hold is `unreadable_row`; a file whose content fails partway (a truncated gzip, a
broken parquet footer, a csv field over the size limit, anything else) keeps the rows read before
and ends with one `unreadable_file` row whose `raw` is the error's type and first line. Whatever is
kept in quarantine (`raw`, `id`) is made valid UTF-8 (bad characters as backslash escapes) and cut
to RAW_LIMIT characters.

The store failing under a read is another matter (see store_errors): it ends the job instead of
quarantining the rest of the file, and the file stays undone for the rerun.

The file's last row carries `file_rows`, the number of rows read from the file; the writer keeps
it with the part that holds that row, and the end-of-job check compares the committed rows with it.

Text is taken as written otherwise: a UTF-8 byte-order mark at the start of a file is dropped,
CRLF line ends are line ends, and a NUL ("\u0000") inside a text is embedded like any other
character (tokenizers drop or encode control characters; a NUL is no reason to lose a row).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import sys
from collections.abc import Iterator
from enum import Enum

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.backfill.store_errors import StoreError, StoreStream, store_error
from semvec.config import InputFormat
from semvec.errors import ConfigError
from semvec.redact import redact
from semvec.storage import InputFile

RAW_LIMIT = 1000  # characters of a bad row kept in quarantine

ROW_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("row", pa.int64()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("reason", pa.string()),  # null: embed it; else why it goes to quarantine
    ("raw", pa.string()),
    ("file_rows", pa.int64()),  # on the file's last row only: how many rows the file has
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
    UNREADABLE_ROW = "unreadable_row"  # a row no column could hold: a guard, not an expected case
    TOKENIZE_FAILED = "tokenize_failed"
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

    def __init__(self, text_field: str, id_field: str | None, max_chars: int, title_field: str | None = None):
        self.text_field = text_field
        self.id_field = id_field
        self.max_chars = max_chars
        self.title_field = title_field

    def check(self, source: str, row: int, record, raw) -> tuple:
        """Validate one parsed record (a mapping) into the output tuple."""
        if not isinstance(record, dict):
            return self.bad(row, Reason.NOT_AN_OBJECT, raw)
        rid = f"{source}:{row}"
        if self.id_field is not None:
            value = record.get(self.id_field)
            if value is None:
                return self.bad(row, Reason.MISSING_ID, raw)
            rid = str(value)
            if not _encodable(rid):
                return self.bad(row, Reason.INVALID_UTF8, raw, rid)
        if self.text_field not in record:  # quarantined under its id, as any other bad text
            return self.bad(row, Reason.MISSING_FIELD, raw, rid)
        text = record[self.text_field]
        title = record.get(self.title_field) if self.title_field is not None else None
        if title is not None and isinstance(text, str):  # as semvec.datasets.read_beir joins them
            text = f"{title} {text}".strip()
        return self.check_text(row, rid, text, raw)

    def check_text(self, row: int, rid: str, text, raw) -> tuple:
        if text is None or (isinstance(text, str) and not text.strip()):
            return self.bad(row, Reason.EMPTY, raw, rid)
        if not isinstance(text, str):
            return self.bad(row, Reason.NON_STRING, raw, rid)
        if not _encodable(text):
            return self.bad(row, Reason.INVALID_UTF8, raw, rid)
        if len(text) > self.max_chars:
            return self.bad(row, Reason.TOO_LONG, raw, rid)
        return (row, rid, text, None, None)

    @staticmethod
    def bad(row: int, reason: Reason, raw, rid: str | None = None) -> tuple:
        """A quarantine row; raw and id are made valid UTF-8 and cut to RAW_LIMIT characters."""
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="backslashreplace")
        elif not isinstance(raw, str):
            raw = json.dumps(raw, default=str, ensure_ascii=False)
        return (row, _kept(rid), None, reason.value, _kept(raw))


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: from JSON escapes or surrogateescape
        return False


def _kept(s: str | None) -> str | None:
    """What quarantine keeps of a value: valid UTF-8, at most RAW_LIMIT characters."""
    if s is None:
        return None
    s = str(s)[:RAW_LIMIT]
    return s.encode("utf-8", "backslashreplace").decode("utf-8")[:RAW_LIMIT]


def _open(fs, file: InputFile) -> io.BufferedIOBase:
    try:
        handle = fs.open(storage.strip(file.uri) if storage.is_remote(file.uri) else file.uri, "rb")
    except Exception as exc:  # noqa: BLE001 - opening is all store (s3fs asks for the size here)
        raise store_error(file.relative, exc) from None
    stream = io.BufferedReader(StoreStream(handle, file.relative))
    if file.relative.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)
    return stream


def _lines(handle) -> Iterator[tuple[int, bytes]]:
    for row, line in enumerate(handle):
        if row == 0:
            line = line.removeprefix(codecs.BOM_UTF8)
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
        except (ValueError, RecursionError):  # JSONDecodeError; too many digits; nested too deep
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
    # surrogateescape keeps bad bytes as lone surrogates so one bad row doesn't end the file;
    # utf-8-sig drops a byte-order mark, which would otherwise rename the first column.
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    # csv's own limit (131,072 characters) is below the default max_chars: a text over max_chars
    # should be text_too_long, not the end of its file. Far past it (an unclosed quote swallowing
    # the rest of the file, usually) the reader stops and the file ends as unreadable_file.
    csv.field_size_limit(max(csv.field_size_limit(), min(4 * p.max_chars, sys.maxsize)))
    reader = csv.reader(text, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    for row, values in enumerate(reader):
        raw = delimiter.join(values)
        if not _encodable(raw):
            yield p.bad(row, Reason.INVALID_UTF8, raw.encode("utf-8", "surrogateescape"))
        elif len(values) != len(header):
            yield p.bad(row, Reason.BAD_COLUMNS, raw)
        else:
            yield p.check(source, row, dict(zip(header, values, strict=True)), raw)


def parse_parquet(handle, source: str, p: RowParser) -> Iterator[tuple]:
    pf = pq.ParquetFile(handle)
    if p.text_field not in pf.schema_arrow.names:
        for row in range(pf.metadata.num_rows):
            yield p.bad(row, Reason.MISSING_FIELD, f"columns: {pf.schema_arrow.names}")
        return
    columns = [p.text_field] + [c for c in (p.id_field, p.title_field) if c]
    columns = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        for i, record in enumerate(_records(batch)):
            if isinstance(record, Exception):
                reason = Reason.INVALID_UTF8 if isinstance(record, UnicodeError) else Reason.UNREADABLE_ROW
                yield p.bad(row, reason, _shown(batch.slice(i, 1)))
            else:
                yield p.check(source, row, record, record)
            row += 1


def _records(batch: pa.RecordBatch) -> list:
    """The batch's rows as dicts; a row Python cannot take (invalid UTF-8) is its exception."""
    try:
        return batch.to_pylist()
    except Exception:  # noqa: BLE001 - find the rows at fault, one by one
        pass
    records: list = []
    for i in range(batch.num_rows):
        try:
            records.append(batch.slice(i, 1).to_pylist()[0])
        except Exception as exc:  # noqa: BLE001 - one bad row is that row's problem only
            records.append(exc)
    return records


def _shown(one: pa.RecordBatch) -> bytes:
    """One row for quarantine's raw, as JSON bytes with strings as stored (a bad byte shows as
    an escape once RowParser.bad decodes it)."""
    shown = {}
    for name, column in zip(one.schema.names, one.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())  # no UTF-8 check: the bytes as stored
        try:
            value = column[0].as_py()
        except Exception as exc:  # noqa: BLE001 - a nested string can be as bad
            value = f"<{type(exc).__name__}>"
        shown[name] = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    return json.dumps(shown, default=str, ensure_ascii=False).encode("utf-8", "surrogateescape")


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


def columns(file: InputFile, fmt: InputFormat, what: str = "input") -> list[str] | None:
    """A table's columns (a csv/tsv header, a parquet schema), read before its rows; None for
    formats without one (jsonl rows name their own fields, txt has none), or when the store fails
    (the job reports that). A file that is not parquet at all is a ConfigError naming `what`."""
    if fmt not in (InputFormat.CSV, InputFormat.TSV, InputFormat.PARQUET) or file.size == 0:
        return None
    try:
        with _open(storage.filesystem(file.uri), file) as handle:
            if fmt == InputFormat.PARQUET:
                return list(pq.ParquetFile(handle).schema_arrow.names)
            text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
            return next(csv.reader(text, delimiter="\t" if fmt == InputFormat.TSV else ","), None) or None
    except StoreError:
        return None
    except Exception as exc:  # noqa: BLE001 - a later file's would be quarantined as unreadable_file
        if fmt != InputFormat.PARQUET:
            return None
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        hint = ", or its format (--input-format)" if what == "input" else ""
        raise ConfigError(f"{what} {file.relative!r} is not readable as parquet ({type(exc).__name__}: "
                          f"{redact(detail)}); check the file{hint}") from None


SAMPLE_BYTES = 1 << 20  # of a jsonl input read to check its field names before work
SAMPLE_ROWS = 100


def require_fields(file: InputFile, fmt: InputFormat, text_field: str, what: str,
                   flag: str = "--text-field", id_field: str | None = None,
                   title_field: str | None = None) -> None:
    """ConfigError, one line, when the first input file shows that every row would go to
    quarantine (a wrong `flag` or --id-field, almost always; or not JSON Lines at all): a table
    without the column, or jsonl whose first rows are no objects or none has the field."""
    names = columns(file, fmt, what)
    kind, where = "column", ""
    if names is None:
        records = sample_records(file, fmt)
        if records is None:
            return
        objects = [r for r in records if isinstance(r, dict)]
        if not objects:
            array = " (it looks like one JSON array: write one element a line, e.g. jq -c '.[]')" \
                if records and (records[0] is _ARRAY_START or isinstance(records[0], list)) else ""
            raise ConfigError(f"{what} {file.relative!r} holds no JSON object in its first "
                              f"{len(records)} line(s): jsonl inputs (.jsonl/.json/.ndjson) hold one "
                              f"object a line{array}")
        names = list(dict.fromkeys(k for r in objects for k in r))
        kind, where = "field", f" in its first {len(objects)} object(s)"
    for field, option in ((text_field, flag), (id_field, "--id-field"), (title_field, "--title-field")):
        if field is not None and field not in names:
            shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
            theirs = "its columns" if kind == "column" else "their fields"
            raise ConfigError(f"{what} {file.relative!r} has no {kind} {field!r}{where} ({theirs}: "
                              f"{shown}); name the {kind} with {option}")


class _ArrayStart:
    """A first line that opens a JSON array: a .json file that is not JSON Lines."""


_ARRAY_START = _ArrayStart()


def sample_records(file: InputFile, fmt: InputFormat) -> list | None:
    """The first rows of a jsonl file as parsed (a broken line as None), read from its first
    SAMPLE_BYTES; None for other formats, an empty or unreadable file, or a first row longer
    than the sample (nothing can be told)."""
    if fmt != InputFormat.JSONL or file.size == 0:
        return None
    try:
        with _open(storage.filesystem(file.uri), file) as handle:
            raw = handle.read(SAMPLE_BYTES)
    except Exception:  # noqa: BLE001 - unreadable here is reported by the job with its reason
        return None
    lines = [line.removesuffix(b"\r") for line in raw.removeprefix(codecs.BOM_UTF8).split(b"\n")]
    if lines and not lines[-1]:
        lines.pop()  # after the last line end
    if len(raw) == SAMPLE_BYTES:  # the last line may be cut
        lines = lines[:-1]
    records = []
    for line in lines[:SAMPLE_ROWS]:
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (ValueError, RecursionError):
            records.append(_ARRAY_START if not records and line.lstrip().startswith(b"[") else None)
    return records or None


def read_all_rows(uri: str, text_field: str, id_field: str | None, max_chars: int,
                  what: str, flag: str = "--text-field") -> list[tuple]:
    """(source, row, id, text, reason) of every row of a small input (a query set, a labels
    file), read in this process as the backfill reads a corpus; `what` names it in errors, and
    `flag` the option that names text_field (a table without that column is refused)."""
    parser = RowParser(text_field, id_field, max_chars)
    rows = []
    for file in storage.list_inputs(uri):
        fmt = detect_format(file.relative, InputFormat.AUTO)
        if fmt is None:
            raise ConfigError(f"{what} {file.relative!r} has no known extension (.jsonl, .parquet, "
                              ".csv, .tsv, .txt, each optionally .gz)")
        require_fields(file, fmt, text_field, what, flag, id_field)
        rows += [(file.relative, row, rid, text, reason)
                 for row, rid, text, reason, _raw in iter_rows(file, fmt, parser)]
    return rows


def read_file_chunks(
    file: InputFile,
    fmt: InputFormat,
    parser: RowParser,
    done_rows: np.ndarray,
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """Yield ROW_SCHEMA tables of at most chunk_rows rows, leaving out rows already done.

    The file's last row carries `file_rows` (its row number + 1); when that row is done already,
    the part that holds it carries it. Raises StoreError when the store fails.
    """
    done = set(done_rows.tolist())
    buf: list[tuple] = []
    for item, last in _last_marked(_guarded(iter_rows(file, fmt, parser))):
        if item[0] in done:
            continue
        buf.append(item)
        if last or len(buf) >= chunk_rows:
            yield _table(file.relative, buf, item[0] + 1 if last else None)
            buf = []
    if buf:
        yield _table(file.relative, buf)


def has_rows(file: InputFile, fmt: InputFormat, parser: RowParser) -> bool:
    """Whether the file holds at least one row (reads up to its first one)."""
    with contextlib.closing(_guarded(iter_rows(file, fmt, parser))) as rows:
        return next(rows, None) is not None


def _last_marked(items: Iterator[tuple]) -> Iterator[tuple[tuple, bool]]:
    """(item, is it the last one): one item ahead, so the last is known when it is handed on."""
    previous = None
    for item in items:
        if previous is not None:
            yield previous, False
        previous = item
    if previous is not None:
        yield previous, True


def _guarded(rows: Iterator[tuple]) -> Iterator[tuple]:
    """The rows of a file until reading it fails; then one unreadable_file row, and no more.

    Any error of the content counts (a truncated gzip, a broken parquet footer, csv.Error, a bug):
    what was read stands, and the rest of the file is one quarantine row at the row number where
    reading stopped. Its raw is the error's type and first line, cleaned of credentials. A
    StoreError is not the content's: it goes on, and ends the job.
    """
    next_row = 0
    while True:
        try:
            item = next(rows)
        except StopIteration:
            return
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - no file may stop the job
            message = redact(str(exc).strip().split("\n", 1)[0][:200])
            yield RowParser.bad(next_row, Reason.UNREADABLE_FILE, f"{type(exc).__name__}: {message}")
            return
        next_row = item[0] + 1
        yield item


def _table(source: str, rows: list[tuple], file_rows: int | None = None) -> pa.Table:
    """ROW_SCHEMA rows of one file; file_rows is set when the last of them is the file's last."""
    try:
        table = _columns(source, rows)
    except Exception:  # noqa: BLE001 - find the rows at fault, one by one
        table = _columns(source, [_buildable(source, r) for r in rows])
    marks = [None] * (len(rows) - 1) + [file_rows]
    return table.append_column(ROW_SCHEMA.field("file_rows"), pa.array(marks, pa.int64()))


def _buildable(source: str, item: tuple) -> tuple:
    """The row if a table can hold it, else a quarantine row in its place."""
    try:
        _columns(source, [item])
        return item
    except Exception as exc:  # noqa: BLE001 - one bad row is that row's problem only
        reason = Reason.INVALID_UTF8 if isinstance(exc, UnicodeError) else Reason.UNREADABLE_ROW
        raw = item[4] if item[4] is not None else item[2]
        return RowParser.bad(item[0], reason, raw, item[1])


def _columns(source: str, rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    schema = ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("file_rows"))
    return pa.table(
        [pa.array([source] * len(rows), pa.string())]
        + [pa.array(c, t) for c, t in zip(cols, schema.types[1:], strict=True)],
        schema=schema,
    )
