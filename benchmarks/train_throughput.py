"""Training throughput: samples/s of `semvec train` with 1 and 2 Ray Train workers, same machine.

    .venv/bin/python benchmarks/train_throughput.py [--rows 1600] [--workers 1,2] [--method full]

STS-B train pairs (the first --rows) with the bundled model, one epoch each, CPU; a sample is one
scored pair (two sentences). The rate is the loop's own `train_samples_per_s` (optimizer steps
only, dev evaluation excluded), summed over workers; Ray start and model load are not in it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1600)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--method", default="full")
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    with open(DATASETS / "stsb" / "sts-train.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][: args.rows + 200]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, part in (("train", rows[:args.rows]), ("dev", rows[args.rows:])):
            with open(Path(tmp) / f"{split}.jsonl", "w") as f:
                for r in part:
                    f.write(json.dumps({"sentence1": r[5], "sentence2": r[6], "score": float(r[4])}) + "\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        for w in [int(x) for x in args.workers.split(",")]:
            cmd = [sys.executable, "-m", "semvec.cli", "train", "--task", "sts", "--method", args.method,
                   "--train", f"{tmp}/train.jsonl", "--dev", f"{tmp}/dev.jsonl", "--output",
                   f"{tmp}/m{w}", "--epochs", "1", "--workers", str(w), "--json"]
            cmd += ["--use-gpu"] if args.use_gpu else []
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            best = json.loads(done.stdout.strip().splitlines()[-1])["best"]
            results[w] = round(best["train_samples_per_s"], 2)
            print(f"workers {w}: {results[w]} samples/s", flush=True)
    base = results.get(1)
    print(json.dumps({"machine": f"{os.cpu_count()} CPU, {platform.processor() or platform.machine()}",
                      "method": args.method, "rows": args.rows, "samples_per_s": results,
                      "speedup_vs_1": {w: round(v / base, 3) for w, v in results.items()} if base else None}))


if __name__ == "__main__":
    main()
