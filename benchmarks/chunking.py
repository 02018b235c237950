"""Long documents: SciFact nDCG@10 with truncated texts vs token windows (best chunk, mean of chunks).

    .venv/bin/python benchmarks/chunking.py [--model bundled] [--windows 128:32,256:64] [--out DIR]
        [--limit-docs N]

Each case is one `semvec embed` of the BEIR SciFact corpus (documents are title + " " + text, as
`semvec evaluate` reads them) and one `semvec evaluate retrieval --vectors DOCS --query-vectors
QUERIES` against its test queries (embedded once, truncated as ever: they are short). Cases:
`truncated` (no --chunk-tokens: texts cut at the model's max_length), and for each window N:M of
--windows, `chunks-N` (--chunk-tokens N --chunk-overlap M, one row per chunk, a document scored by
its best chunk) and `mean-N` (the same with --aggregate mean: one token-weighted mean vector per
document). The default windows are the ones measured with sentence-transformers in
../shared/MEASURED.md (truncated 0.6451; 128/32: best 0.6745, mean 0.6465; 256/64: best 0.6527,
mean 0.6477), to compare with.

Data from ../shared/datasets/beir_scifact (or SEMVEC_DATASETS). --limit-docs N keeps the first N
documents and only the test queries whose judged documents are all among them (a smoke run; its
numbers say nothing about quality). Prints one JSON line; work files go under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from scifact import prepare  # noqa: E402


def semvec(*args: str) -> dict:
    """One `semvec ... --json` command; its JSON summary (the last line of its output)."""
    done = subprocess.run([sys.executable, "-m", "semvec.cli", *args, "--json"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"semvec {args[0]} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(windows: str) -> dict[str, list[str]]:
    """case name -> the `semvec embed` flags of its documents."""
    out: dict[str, list[str]] = {"truncated": []}
    for spec in filter(None, (w.strip() for w in windows.split(","))):
        size, overlap = spec.split(":")
        flags = ["--chunk-tokens", size, "--chunk-overlap", overlap]
        out[f"chunks-{size}"] = flags
        out[f"mean-{size}"] = [*flags, "--aggregate", "mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled", help="model reference to embed with (default: bundled)")
    ap.add_argument("--windows", default="128:32,256:64",
                    help="windows as TOKENS:OVERLAP, comma-separated (default: 128:32,256:64)")
    ap.add_argument("--out", default=str(REPO / "out" / "chunking"),
                    help="work folder, emptied first (default: out/chunking)")
    ap.add_argument("--limit-docs", type=int, help="keep the first N documents: a smoke run (default: all)")
    args = ap.parse_args()
    out, files = prepare(args.out, args.limit_docs)
    common = ["--model", args.model, "--id-field", "_id"]
    semvec("embed", files["queries"], str(out / "queries"), *common)
    judged = ["--corpus", files["corpus"], "--queries", files["queries"], "--qrels", files["qrels"]]
    row: dict = {"benchmark": "chunking", "model": args.model, "cases": {}}
    for name, flags in cases(args.windows).items():
        t = time.perf_counter()
        embedded = semvec("embed", files["corpus"], str(out / name), *common, *flags)
        seconds = round(time.perf_counter() - t, 1)
        got = semvec("evaluate", "retrieval", "--vectors", str(out / name), "--query-vectors",
                     str(out / "queries"), *judged)
        row.update(docs=got["docs"], queries=got["queries"])
        row["cases"][name] = {**{k: round(v, 4) for k, v in got.items() if isinstance(v, float)},
                              "chunks": embedded.get("chunks"), "embed_s": seconds}
        print(f"{name}: ndcg@10 {row['cases'][name]['ndcg@10']}, {embedded.get('chunks')} chunks, "
              f"{seconds} s", file=sys.stderr, flush=True)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
