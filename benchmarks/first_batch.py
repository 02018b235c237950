"""Seconds from `semvec embed` starting to its first committed part, and to its end, on Ray and
without it (a job under --ray-from-rows, the default for a small job started without a cluster).

    .venv/bin/python benchmarks/first_batch.py [--rows 2000] [--batch-rows 256] [--rounds 3] [--out FILE]

Corpus: the mixed corpus of benchmarks/throughput.py (80% STS-B sentences, 20% SciFact abstracts,
seed 0). Each run is a fresh process, as a user starts it, with --batch-rows and --rows-per-file
set to the same value, so the first part appears once the first batch is read, tokenized, encoded
and written: the clock runs from just before the process starts to that file's appearance (polled
every 10 ms), and to the process's end. The two ways run interleaved, --rounds times; medians are
reported. Ray's own start is in the "on Ray" times, as a user pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import mixed_corpus  # benchmarks/throughput.py

REPO = Path(__file__).resolve().parents[1]
WAYS = {"on Ray (--ray-from-rows 1)": ["--ray-from-rows", "1"], "defaults (without Ray)": []}


def one_run(corpus: Path, out: Path, batch_rows: int, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "semvec.cli", "embed", str(corpus), str(out), "--id-field", "id",
            "--batch-rows", str(batch_rows), "--rows-per-file", str(batch_rows), *extra, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and any(out.glob("part-*.parquet")):
            first = time.perf_counter() - t0
        time.sleep(0.01)
    total = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"semvec embed failed:\n{stderr[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"first_part_s": round(first if first is not None else total, 2), "total_s": round(total, 2),
            "ran_on": manifest["ran_on"], "rows": json.loads(stdout.strip().splitlines()[-1])["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--batch-rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here too")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                  for i, t in enumerate(mixed_corpus(a.rows))))
        runs: dict[str, list[dict]] = {w: [] for w in WAYS}
        for r in range(a.rounds):
            for way, extra in WAYS.items():
                got = one_run(corpus, Path(tmp) / f"out-{r}-{len(runs[way])}-{extra and 'ray'}", a.batch_rows,
                              extra)
                runs[way].append(got)
                print(f"round {r + 1} {way}: {got}", flush=True)
    result = {"rows": a.rows, "batch_rows": a.batch_rows, "rounds": a.rounds, "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "runs": runs, "median": {
                  w: {k: statistics.median(x[k] for x in v) for k in ("first_part_s", "total_s")}
                  for w, v in runs.items()}}
    print(f"\n{a.rows} rows, first part = {a.batch_rows} rows; medians of {a.rounds} rounds")
    print("| way | seconds to the first part | seconds to the end |\n| --- | --- | --- |")
    for way, m in result["median"].items():
        print(f"| {way} | {m['first_part_s']:.2f} | {m['total_s']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
