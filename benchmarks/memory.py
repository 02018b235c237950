"""Memory: peak resident memory of a whole backfill (driver + every Ray process) at two sizes.

    .venv/bin/python benchmarks/memory.py [--small 100000] [--large 1000000] [--out FILE]

A tiny seeded model (semvec.testing) keeps compute small so the corpus size is what varies.
The backfill runs as a fresh `semvec embed` process; every 0.25 s the resident memory of that
process and all its descendants (GCS, raylet, workers, actors) is summed, and the peak kept.
Streaming means the large run's peak stays close to the small run's: growth = large / small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from semvec.testing import build_tiny_model, corpus_sentences

REPO = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def write_corpus(path: Path, rows: int) -> None:
    pool = corpus_sentences(5000, seed=1)  # cycled: the size matters here, not the text
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "text": pool[i % len(pool)]}) + "\n")


def peak_of_backfill(corpus: Path, out: Path, model: Path) -> dict:
    cmd = [sys.executable, "-m", "semvec.cli", "embed", str(corpus), str(out), "--model",
           str(model), "--id-field", "id", "--json"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.25)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"backfill failed (exit {proc.returncode})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"rows": summary["embedded"], "peak_rss_mb": round(peak / 2**20, 1),
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model")
        runs = []
        for rows in (args.small, args.large):
            corpus = tmp / f"corpus-{rows}.jsonl"
            write_corpus(corpus, rows)
            runs.append(peak_of_backfill(corpus, tmp / f"out-{rows}", model))
            corpus.unlink()
    result = {"small": runs[0], "large": runs[1],
              "growth": round(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
