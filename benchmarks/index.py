"""Search indexes: recall@10 against exact search, queries per second and build time, per kind.

    .venv/bin/python benchmarks/index.py [--scales 100k,1m] [--out DIR]

Two sources, each indexed with `semvec index --kind exact|hnsw|ivf` at its defaults (hnsw M 32,
ef_construction 200; ivf 4 sqrt(n) lists, at most one per 39 training vectors, trained on a
seeded sample of 100,000), each build timed as the command reports it, from plan to written
record (a source of 200,000 vectors or more is read, and ivf shards added, by Ray tasks: its
build time includes starting Ray in that process):
- 100k: 100,000 distinct real texts of ../shared/datasets (SST-2 train, STS-B, BANKING77, TREC,
  in that order) embedded with the bundled model by `semvec embed`; the queries are 1,000 SST-2
  dev and test sentences that are not in the corpus, embedded the same way.
- 1m (synthetic): 1,000,000 seeded vectors of dim 384, a mixture of 2,000 Gaussian clusters
  around random unit directions (noise 0.04 per coordinate: a point's cosine to its centre is
  ~0.8, to another point of its cluster ~0.6, nearly alike, which makes the top 10 a near tie:
  harder for hnsw than real vectors, kinder to ivf), scaled to unit length; 1,000 queries drawn the
  same way with another seed. Written as a backfill-shaped output (manifest model reference
  "synthetic"): the issue allows seeded vectors at this size, where embedding a million texts on
  2 cores takes hours.

Each index answers the same query vectors, k 10, all queries in one call, FAISS's threads on every
core. recall@10: the share of the exact index's top 10 that the index returns, averaged over
queries. queries/s: the median of 3 timed passes after one warm-up (1 pass when the warm-up took
over 10 s), through the API (SearchIndex.search_vectors: ids and rounded scores as Python lists)
and bare (the FAISS index's own search). HNSW is also timed at ef_search 64 and 256, IVF at nprobe
8, 32 and 64 (search-time settings of the same index). Prints one JSON line per (scale, kind,
setting) and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from commands import semvec  # benchmarks/commands.py

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))
SWEEP = {"exact": [{}], "hnsw": [{"ef_search": 128}, {"ef_search": 64}, {"ef_search": 256}],
         "ivf": [{"nprobe": 16}, {"nprobe": 8}, {"nprobe": 32}, {"nprobe": 64}]}


# ---------------------------------------------------------------- sources


def _tsv_column(path: Path, column: int, encoding: str = "utf-8") -> list[str]:
    with open(path, encoding=encoding, newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row[column] for row in rows if len(row) > column]


def real_texts() -> tuple[list[str], list[str]]:
    """100,000 distinct corpus texts and 1,000 query sentences outside them."""
    sst = DATASETS / "sst2"
    corpus: dict[str, None] = {}
    corpus.update(dict.fromkeys(_tsv_column(sst / "sentiment-train", 0)))
    for split in ("train", "dev", "test"):
        with open(DATASETS / "stsb" / f"sts-{split}.csv", encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                corpus.update(dict.fromkeys(row[5:7]))
    for split in ("train", "test"):
        with open(DATASETS / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as f:
            corpus.update(dict.fromkeys(r["text"] for r in csv.DictReader(f)))
    with open(DATASETS / "trec" / "train_5500.label", encoding="latin-1") as f:
        corpus.update(dict.fromkeys(line.split(" ", 1)[1].strip() for line in f if " " in line))
    texts = [t.strip() for t in corpus if t and t.strip()]
    texts = list(dict.fromkeys(texts))[:100_000]
    if len(texts) < 100_000:
        sys.exit(f"only {len(texts)} distinct texts found under {DATASETS}")
    held = set(texts)
    queries = [t for split in ("sentiment-dev", "sentiment-test") for t in _tsv_column(sst / split, 0)]
    queries = [q for q in dict.fromkeys(q.strip() for q in queries) if q and q not in held][:1000]
    return texts, queries


def embedded(texts: list[str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_suffix(".jsonl")
    source.write_text("".join(json.dumps({"id": f"t{i:06d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    if not (out / "_manifest.json").exists() or json.loads((out / "_manifest.json").read_text()).get(
            "status") != "complete":
        semvec("embed", str(source), str(out), "--id-field", "id", "--overwrite")
    return out


def mixture(n: int, dim: int, seed: int, centres: np.ndarray, spread: float = 0.04) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(0, spread, (n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(out: Path, n: int = 1_000_000, dim: int = 384, per_part: int = 50_000) -> Path:
    """A backfill-shaped output of n seeded mixture vectors (parts and a complete manifest)."""
    if (out / "_manifest.json").exists():
        return out
    centres = np.random.default_rng(12345).normal(0, 1, (2000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for first in range(0, n, per_part):
        x = mixture(min(per_part, n - first), dim, first, centres)  # seeded per part
        ids = pa.array([f"s{i:07d}" for i in range(first, first + len(x))])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
        pq.write_table(pa.table({"id": ids, "embedding": emb}),
                       staging / f"part-synthetic-{first:012d}-{first + len(x) - 1:012d}.parquet")
    fingerprint = hashlib.sha256(f"mixture 2000x{dim} seed 12345 spread 0.04 n {n}".encode()).hexdigest()
    manifest = {"status": "complete", "config_hash": fingerprint[:16], "finished_at": "synthetic",
                "model": {"reference": "synthetic", "fingerprint": fingerprint, "dim": dim,
                          "pooling": None, "normalize": True, "max_length": None, "dtype": "float32"},
                "totals": {"rows": n, "embedded": n, "quarantined": 0}, "chunking": None}
    (staging / "_manifest.json").write_text(json.dumps(manifest))
    np.save(out.with_suffix(".queries.npy"), mixture(1000, dim, 1, centres))
    staging.rename(out)  # last: a crash before leaves no output a rerun would take as whole
    return out


def query_vectors(source: Path) -> np.ndarray:
    from semvec.evaluate import load_vectors

    found = load_vectors(str(source))
    return np.stack([found[k] for k in sorted(found)]).astype(np.float32)


# ---------------------------------------------------------------- measuring


def _rate(search, n: int) -> tuple[float, object]:
    t = time.perf_counter()
    answers = search()  # warm-up, and the answers
    times = []
    for _ in range(3 if time.perf_counter() - t < 10 else 1):  # one timed pass when slow
        t = time.perf_counter()
        search()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times), answers


def qps(index, queries: np.ndarray, setting: dict) -> tuple[float, float, list[list[str]]]:
    """(queries/s through the API, bare FAISS queries/s, the answers' ids)."""
    api, hits = _rate(lambda: index.search_vectors(queries, 10, **setting), len(queries))
    unit = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    bare, _ = _rate(lambda: index.index.search(unit, 10), len(queries))  # settings stay as the API set
    return api, bare, [h.ids for h in hits]


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def measure(scale: str, vectors: Path, queries: np.ndarray, out: Path) -> list[dict]:
    from semvec.search import open_index
    from semvec.search.store import files_of

    rows, exact = [], None
    for kind in ("exact", "hnsw", "ivf"):
        target = out / f"index-{scale}-{kind}"
        built = semvec("index", str(vectors), str(target), "--kind", kind, "--overwrite")
        index = open_index(str(target))
        index_bytes = index.record["files"][files_of(index.record)["index"]]["bytes"]
        for setting in SWEEP[kind]:
            api, bare, found = qps(index, queries, setting)
            exact = exact if exact is not None else found
            row = {"scale": scale, "vectors": built["rows"], "kind": kind, "setting": setting,
                   "recall@10": round(recall(found, exact), 4), "queries_per_s": round(api, 1),
                   "bare_queries_per_s": round(bare, 1),
                   "build_s": built.get("seconds"), "built_on": index.record.get("built_on"),
                   "params": index.record["params"], "index_bytes": index_bytes}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del index
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| vectors | kind | search setting | recall@10 | queries/s (API / bare) | build s (on) "
             "| index MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        setting = ", ".join(f"{k} {v}" for k, v in r["setting"].items()) or "-"
        lines.append(f"| {r['vectors']:,}{' synthetic' if r['scale'] == '1m' else ''} | {r['kind']} | "
                     f"{setting} | {r['recall@10']:.4f} | {r['queries_per_s']:,.0f} / "
                     f"{r['bare_queries_per_s']:,.0f} | {r['build_s']} ({r['built_on']}) | "
                     f"{r['index_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="100k,1m")
    ap.add_argument("--out", default="/tmp/semvec-index-bench")
    args = ap.parse_args()
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    if set(scales) - {"100k", "1m"}:
        sys.exit("--scales takes 100k and/or 1m")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "100k" in scales:
        texts, queries = real_texts()
        vectors = embedded(texts, out / "real-100k")
        rows += measure("100k", vectors, query_vectors(embedded(queries, out / "real-queries")), out)
    if "1m" in scales:
        vectors = synthetic(out / "synthetic-1m")
        rows += measure("1m", vectors, np.load(vectors.with_suffix(".queries.npy")), out)
    print(table(rows))


if __name__ == "__main__":
    main()
