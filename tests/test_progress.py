"""Backfill progress: the row estimate behind the ETA, and the line a person reads."""

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from semvec.backfill.progress import Progress, estimate_rows
from semvec.config import InputFormat
from semvec.storage import list_inputs


def test_the_row_estimate_is_close_for_jsonl_gzip_and_exact_for_parquet(tmp_path):
    rows = [{"text": f"sentence number {i} " + "word " * (i % 17)} for i in range(20_000)]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name, fmt in (("a.jsonl", InputFormat.JSONL), ("b.jsonl.gz", InputFormat.JSONL),
                      ("c.parquet", InputFormat.PARQUET)):
        files = list_inputs(str(tmp_path / name))
        estimate = estimate_rows(files + files, fmt)  # two files of the same kind
        assert abs(estimate - 40_000) < 0.2 * 40_000, (name, estimate)
    assert estimate_rows([], InputFormat.JSONL) is None
    # a whole file read, its last row without a line end, counts that row (None sent a one-row
    # job to Ray); a row longer than the sample tells nothing
    (tmp_path / "one-line.txt").write_bytes(b"no newline at all")
    assert estimate_rows(list_inputs(str(tmp_path / "one-line.txt")), InputFormat.TXT) == 1
    (tmp_path / "long.txt").write_bytes(b"x" * 300_000)
    assert estimate_rows(list_inputs(str(tmp_path / "long.txt")), InputFormat.TXT) is None
    # an empty first file: the sample is the first file with bytes
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "0-empty.jsonl").write_bytes(b"")
    (tmp_path / "folder" / "1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n')
    assert estimate_rows(list_inputs(str(tmp_path / "folder")), InputFormat.JSONL) == 2


def test_the_progress_line_has_counts_rate_and_eta(caplog):
    progress = Progress(expected=1000, every=0.0)
    progress.start -= 10  # ten seconds in
    logger = logging.getLogger("semvec.backfill")  # semvec's own handler may not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="semvec.backfill"):
            progress.update(embedded=180, quarantined=20)
    finally:
        logger.removeHandler(caplog.handler)
    line = caplog.records[-1].getMessage()
    assert line.startswith("200 of ~1,000 rows (20%), 20 rows/s, ETA ~40s; 180 embedded, 20 quarantined")
    assert Progress(expected=None).line().startswith("0 rows, 0 rows/s; 0 embedded")
