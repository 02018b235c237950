"""What a person watching a backfill reads: rows so far, rows/s, an ETA, and how many rows were
embedded and quarantined; one line at most every few seconds, and never a line a pipe fills up on.

The ETA needs the number of rows to come, which nobody knows without reading the corpus: it is
estimated from the bytes still to read and the bytes per row of a sample (the first 256 KiB of the
first file still to do, or its parquet footer), and shown as approximate ("~").
"""

from __future__ import annotations

import logging
import time
import zlib

from semvec import storage
from semvec.config import InputFormat
from semvec.storage import InputFile

log = logging.getLogger("semvec.backfill")

SAMPLE_BYTES = 256 * 1024


def estimate_rows(files: list[InputFile], fmt: InputFormat | None) -> int | None:
    """Rows in files, estimated from a sample of the first; None when it cannot be told."""
    if not files or fmt is None:
        return None
    total = sum(f.size for f in files)
    first = next((f for f in files if f.size), None)
    if first is None:
        return 0
    try:
        per_byte = _rows_per_byte(first, fmt)
    except Exception:  # noqa: BLE001 - an estimate only: the job itself reports real errors
        return None
    return max(1, round(per_byte * total)) if per_byte else None


def _rows_per_byte(file: InputFile, fmt: InputFormat) -> float | None:
    fs = storage.filesystem(file.uri)
    path = storage.strip(file.uri)
    if fmt == InputFormat.PARQUET:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows / max(1, file.size)
    with fs.open(path, "rb") as f:
        raw = f.read(SAMPLE_BYTES)
    text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw) if path.endswith(".gz") else raw
    lines = text.count(b"\n")
    if len(raw) == file.size and text and not text.endswith(b"\n"):
        lines += 1  # the whole file, its last row without a line end
    return lines / len(raw) if lines else None  # rows per byte as stored (compressed or not)


class Progress:
    """Counts from the writers as they commit; ``update`` logs a line when ``every`` seconds passed."""

    def __init__(self, expected: int | None, every: float = 10.0):
        self.expected, self.every = expected, every
        self.rows = self.embedded = self.quarantined = 0
        self.start = self.last = time.monotonic()

    def update(self, embedded: int, quarantined: int) -> None:
        self.embedded += embedded
        self.quarantined += quarantined
        self.rows += embedded + quarantined
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.start)
        rate = self.rows / elapsed
        done = f"{self.rows:,} rows"
        eta = ""
        if self.expected and rate > 0:
            share = min(self.rows / self.expected, 0.99)  # an estimate may fall short of the truth
            left = max(self.expected - self.rows, 0) / rate
            done = f"{self.rows:,} of ~{self.expected:,} rows ({share:.0%})"
            eta = f", ETA ~{_clock(left)}"
        return (f"{done}, {rate:,.0f} rows/s{eta}; {self.embedded:,} embedded, "
                f"{self.quarantined:,} quarantined")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
