"""`semvec search INDEX --queries FILE --output OUT`: a file of queries answered in one pass.

The queries are read as `semvec embed` reads a corpus (a file, folder or glob, local or s3://;
jsonl, parquet, csv, tsv, txt, each optionally .gz; --text-field, --id-field) and held in memory:
a query set, not a corpus. The output is jsonl, one line per query row in input order:
`query_id`, `ids` (best first), `scores` (cosine); a row that cannot be a query (no text, bad
JSON, ...) gets a line too, with `error` (the backfill's quarantine reason) and no hits, so no
row is lost. The output is written whole, once, at the end (a rerun after a crash writes it anew).
"""

from __future__ import annotations

import json
import time

from semvec import crashpoints, storage
from semvec.backfill.read import read_all_rows
from semvec.errors import ConfigError
from semvec.search.index import SearchIndex

EMBED_BATCH = 1024  # queries embedded (and searched) at a time
MAX_CHARS = 200_000  # as the backfill's default: a longer query is an error line


def check_output(queries: str, output: str) -> None:
    """Refuse, before any work, answers written over the queries or among them (inside the
    queries' folder, or matching their glob: a rerun would read them as queries), and an output
    that cannot be written (a folder, a place not writable)."""
    where = storage.placement(queries, output)
    if where == "same":
        raise ConfigError(f"--output {storage.display(output)!r} is the queries file; write the "
                          "answers elsewhere")
    if where == "inside" or storage.glob_lists(queries, output):
        raise ConfigError(f"--output {storage.display(output)!r} lies among the queries "
                          f"{storage.display(queries)!r}: a rerun would read the answers as "
                          "queries; write them elsewhere")
    storage.check_file_writable(output, "--output")


def search_file(index: SearchIndex, queries: str, output: str, k: int = 10, text_field: str = "text",
                id_field: str | None = None, model: str | None = None, **tuning) -> dict:
    """Answer every query row of `queries` into the jsonl file `output`; the summary."""
    t0 = time.time()
    check_output(queries, output)
    index.check_tuning(k, **tuning)
    rows = read_all_rows(queries, text_field, id_field, MAX_CHARS, "queries file")
    good = [i for i, r in enumerate(rows) if r[4] is None]
    index.encoder(model)  # the model and its fingerprint checked before any query is embedded
    hits: dict[int, dict] = {}
    for start in range(0, len(good), EMBED_BATCH):
        batch = good[start:start + EMBED_BATCH]
        answers = index.search([rows[i][3] for i in batch], k, model=model, **tuning)
        for i, answer in zip(batch, answers, strict=True):
            hits[i] = {"ids": answer.ids, "scores": answer.scores}
    lines = []
    for i, (source, row, rid, _text, reason) in enumerate(rows):
        line = {"query_id": rid if rid is not None else f"{source}:{row}"}
        line.update(hits[i] if i in hits else {"source": source, "row": row, "error": reason})
        lines.append(json.dumps(line, ensure_ascii=False))
    crashpoints.arm()
    fs = storage.filesystem(output)
    storage.write_atomic(fs, storage.strip(output), ("\n".join(lines) + "\n").encode() if lines else b"")
    return {"index": storage.display(index.uri), "queries": len(rows), "answered": len(good),
            "errors": len(rows) - len(good), "k": k, "output": storage.display(output),
            "seconds": round(time.time() - t0, 2)}
