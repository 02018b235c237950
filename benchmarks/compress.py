"""Compression: SciFact nDCG@10 and bytes per vector for float32, PCA, int8 and binary (rescored).

    .venv/bin/python benchmarks/compress.py [--model bundled] [--pca 256,128] [--out DIR]
        [--limit-docs N]

One backfill of the BEIR SciFact corpus (documents are title + " " + text, as `semvec evaluate`
reads them) and of its 300 test queries, with the model given (default: the bundled
all-MiniLM-L6-v2); then one `semvec compress` of the documents per case, each scored with
`semvec evaluate retrieval --vectors COMPRESSED --query-vectors FLOAT_QUERIES` (the saved
projection applied to the queries; binary: Hamming distance, the top 100 rescored with the int8
codes stored beside the bits). Cases: float32 (the backfill itself), pca-D for each --pca, int8,
binary. Bytes per vector are the payload before parquet's compression: "search" is what the first
pass of a search holds, "stored" all that is written (binary keeps its int8 codes too).

Data from ../shared/datasets/beir_scifact (or SEMVEC_DATASETS). --limit-docs N keeps the first N
documents and only the test queries whose judged documents are all among them (a smoke run; its
numbers say nothing about quality). Prints one JSON line; work files go under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from scifact import prepare  # noqa: E402


def cases(pca_dims: list[int]) -> dict[str, dict]:
    return {**{f"pca-{d}": {"pca": d} for d in pca_dims}, "int8": {"quantize": "int8"},
            "binary": {"quantize": "binary"}}


def scores(result: dict) -> dict:
    return {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled", help="model reference to embed with (default: bundled)")
    ap.add_argument("--pca", default="256,128", help="PCA dims, comma-separated (default: 256,128)")
    ap.add_argument("--out", default=str(REPO / "out" / "compress"),
                    help="work folder, emptied first (default: out/compress)")
    ap.add_argument("--limit-docs", type=int, help="keep the first N documents: a smoke run (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from semvec.backfill.job import run as backfill
    from semvec.compress import load_compress_config
    from semvec.compress.job import run as compress
    from semvec.config import load_embed_config
    from semvec.evaluate import evaluate

    out, files = prepare(args.out, args.limit_docs)
    t = time.perf_counter()
    for name in ("docs", "queries"):
        src = files["corpus"] if name == "docs" else files["queries"]
        backfill(load_embed_config(None, input=src, output=str(out / name), model=args.model,
                                   id_field="_id"))
    row: dict = {"benchmark": "compress", "model": args.model,
                 "backfill_s": round(time.perf_counter() - t, 1)}
    float32 = evaluate("retrieval", vectors=str(out / "docs"), query_vectors=str(out / "queries"), **files)
    dim = json.loads((out / "docs" / "_manifest.json").read_text())["model"]["dim"]
    row.update(docs=float32["docs"], queries=float32["queries"], dim=dim)
    results = {"float32": {**scores(float32), "bytes_per_vector": {"search": 4 * dim, "stored": 4 * dim}}}
    for name, settings in cases([int(d) for d in args.pca.split(",") if d.strip()]).items():
        t = time.perf_counter()
        summary = compress(load_compress_config(None, vectors=str(out / "docs"), output=str(out / name),
                                                **settings))
        seconds = round(time.perf_counter() - t, 1)
        got = evaluate("retrieval", vectors=str(out / name), query_vectors=str(out / "queries"), **files)
        b = summary["bytes_per_vector"]
        results[name] = {**scores(got), "bytes_per_vector": {"search": b["search"], "stored": b["stored"]},
                         "explained_variance": summary["explained_variance"], "compress_s": seconds}
        print(f"{name}: ndcg@10 {results[name]['ndcg@10']} (float32 {results['float32']['ndcg@10']}), "
              f"{b['search']} bytes searched, {b['stored']} stored", file=sys.stderr, flush=True)
    row["cases"] = results
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
