"""BEIR SciFact's test split as the benchmarks read it (benchmarks/chunking.py, compress.py).

Documents are title + " " + text, as `semvec evaluate` reads them. Data from
../shared/datasets/beir_scifact (or SEMVEC_DATASETS).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))
SCIFACT = DATASETS / "beir_scifact"


def write_inputs(out: Path, limit: int | None) -> dict:
    """docs.jsonl (_id, text = title + text), queries.jsonl and qrels.tsv of the test split."""
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f][:limit] if limit else [json.loads(line) for line in f]
    kept = {str(d["_id"]) for d in docs}
    judged: dict[str, list[tuple[str, str]]] = {}
    with open(SCIFACT / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            qid, doc, score = line.rstrip("\n").split("\t")
            judged.setdefault(qid, []).append((doc, score))
    judged = {q: pairs for q, pairs in judged.items() if all(d in kept for d, _ in pairs)}
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        queries = [q for q in map(json.loads, f) if str(q["_id"]) in judged]
    if not queries:
        sys.exit(f"no test query has all its judged documents among the first {limit} documents")
    files = {"corpus": out / "docs.jsonl", "queries": out / "queries.jsonl", "qrels": out / "qrels.tsv"}
    with open(files["corpus"], "w", encoding="utf-8") as f:
        for d in docs:
            text = (str(d.get("title") or "") + " " + str(d.get("text") or "")).strip()
            f.write(json.dumps({"_id": str(d["_id"]), "text": text}) + "\n")
    with open(files["queries"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": str(q["_id"]), "text": q["text"]}) + "\n" for q in queries)
    with open(files["qrels"], "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, pairs in judged.items() for d, s in pairs)
    return {k: str(v) for k, v in files.items()}


def prepare(out: str, limit: int | None) -> tuple[Path, dict]:
    """The work folder, emptied (a run starts clean: no prefix is resumed), and the inputs in it."""
    if not SCIFACT.is_dir():
        sys.exit(f"SciFact not found at {SCIFACT}; set SEMVEC_DATASETS")
    folder = Path(out).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder, write_inputs(folder, limit)
