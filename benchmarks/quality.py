"""Fine-tuning quality on the shared benchmarks, from the defaults a user gets.

    .venv/bin/python benchmarks/quality.py [--cases stsb-full,trec-full,...] [--out DIR]

Each case runs `semvec train` given only task, method, train, dev and output (every other
setting is the default), which chooses its checkpoint on dev only; then the exported model is
scored once on the test split with `semvec evaluate`. Zero-shot cases score the bundled model
on test without training. Data come from ../shared/datasets (or SEMVEC_DATASETS); where a
benchmark has no dev split (TREC) the trainer holds out a seeded 10% of train. Runs are tracked
in a throw-away MLflow store under --out. One JSON line per case is appended to
DIR/results.jsonl and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from commands import semvec  # benchmarks/commands.py

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))

STSB = ("stsb/sts-train.csv", "stsb/sts-dev.csv", "stsb/sts-test.csv")
CNSD = tuple(f"zh_similarity/cnsd_stsb/cnsd-sts-{s}.txt" for s in ("train", "dev", "test"))
CONLL = tuple(f"conll2003/iob2/{s}.txt" for s in ("train", "valid", "test"))
TREC = ("trec/train_5500.label", None, "trec/TREC_10.label")

# name -> (task, method or None for zero-shot, (train, dev, test))
CASES = {
    "stsb-zero-shot": ("sts", None, STSB),
    "stsb-full": ("sts", "full", STSB),
    "stsb-lora": ("sts", "lora", STSB),
    "trec-full": ("classification", "full", TREC),
    "conll-full": ("ner", "full", CONLL),
    "conll-lora": ("ner", "lora", CONLL),
    "conll-bitfit": ("ner", "bitfit", CONLL),
    "cnsd-zero-shot": ("sts", None, CNSD),
    "cnsd-full": ("sts", "full", CNSD),
}
TEST_METRIC = {"sts": "spearman", "classification": "accuracy", "ner": "f1"}


def run_case(name: str, out: Path, env: dict) -> dict:
    task, method, (train, dev, test) = CASES[name]
    row: dict = {"case": name, "task": task, "method": method or "zero-shot"}
    t = time.perf_counter()
    model = "bundled"
    if method:
        model = str(out / name)
        for stale in (out / name, out / f"{name}-checkpoints"):  # a same-named run would resume
            shutil.rmtree(stale, ignore_errors=True)
        args = ["train", "--task", task, "--method", method, "--train", str(DATASETS / train),
                "--output", model]
        if dev:
            args += ["--dev", str(DATASETS / dev)]
        summary = semvec(*args, env=env)
        row.update(train_seconds=round(time.perf_counter() - t, 1),
                   dev={k: round(v, 4) for k, v in summary["best"].items() if isinstance(v, float)},
                   trainable_parameters=summary["trainable_parameters"],
                   total_parameters=summary["total_parameters"])
    result = semvec("evaluate", task, "--model", model, "--data", str(DATASETS / test), env=env)
    row["test"] = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    row["test_" + TEST_METRIC[task]] = row["test"][TEST_METRIC[task]]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| case | test metric | dev (chosen on) | trainable params | train s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        key = TEST_METRIC[r["task"]]
        dev = r.get("dev", {})
        dev_key = next((k for k in dev if k.startswith("dev_") and k.endswith(key)), None)
        lines.append(f"| {r['case']} | {key} {r['test'][key]:.4f} | "
                     f"{f'{dev_key} {dev[dev_key]:.4f}' if dev_key else '-'} | "
                     f"{r.get('trainable_parameters', '-')} | {r.get('train_seconds', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--out", default=str(REPO / "out" / "quality"))
    args = ap.parse_args()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(CASES)}")
    if not DATASETS.is_dir():
        sys.exit(f"datasets not found at {DATASETS}; set SEMVEC_DATASETS")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    rows = []
    for name in names:
        row = run_case(name, out, env)
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
