"""Forgetting: tune on task A, then on task B with and without continual learning.

    .venv/bin/python benchmarks/forgetting.py [--model-a DIR] [--epochs-b N] [--out DIR]

A = STS-B (English), B = CNSD (Chinese STS-B), both from ../shared/datasets (or SEMVEC_DATASETS).
Model A is the bundled model tuned on STS-B train with the defaults (or --model-a, e.g. the
stsb-full model benchmarks/quality.py wrote). From A, two runs on CNSD train, each choosing its
checkpoint on CNSD dev only: plain, and continual (STS-B train replayed at replay_share 0.5 and
distillation toward A at weight 1.0, the retraining defaults; --l2sp/--ewc add those terms).
Every model is scored once on both test splits. The table goes to stdout and DIR/forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))
A = {s: DATASETS / "stsb" / f"sts-{s}.csv" for s in ("train", "dev", "test")}
B = {s: DATASETS / "zh_similarity" / "cnsd_stsb" / f"cnsd-sts-{s}.txt" for s in ("train", "dev", "test")}


def semvec(*args: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "semvec.cli", *args, "--json"], capture_output=True,
                            text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"semvec {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train(out: Path, data: dict, model: str, env: dict, extra: list[str]) -> str:
    for stale in (out, Path(f"{out}-checkpoints")):  # a same-named run would resume
        shutil.rmtree(stale, ignore_errors=True)
    semvec("train", "--task", "sts", "--method", "full", "--train", str(data["train"]), "--dev",
           str(data["dev"]), "--output", str(out), "--model", model, *extra, env=env)
    return str(out)


def scores(model: str, env: dict) -> dict:
    return {task: round(semvec("evaluate", "sts", "--model", model, "--data", str(split["test"]),
                               env=env)["spearman"], 4) for task, split in (("A", A), ("B", B))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-a", help="a model already tuned on STS-B (default: train one)")
    ap.add_argument("--epochs-b", type=int, default=None, help="epochs on B (default: the train default)")
    ap.add_argument("--l2sp", type=float, default=0.0)
    ap.add_argument("--ewc", type=float, default=0.0)
    ap.add_argument("--distill", type=float, default=1.0)
    ap.add_argument("--replay-share", type=float, default=0.5)
    ap.add_argument("--out", default=str(REPO / "out" / "forgetting"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    model_a = args.model_a or train(out / "model-a", A, "bundled", env, [])
    extra = ["--epochs", str(args.epochs_b)] if args.epochs_b else []
    plain = train(out / "model-b-plain", B, model_a, env, extra)
    continual = train(out / "model-b-continual", B, model_a, env, extra + [
        "--replay", str(A["train"]), "--replay-share", str(args.replay_share), "--distill",
        str(args.distill), "--l2sp", str(args.l2sp), "--ewc", str(args.ewc)])
    rows = {"bundled (zero-shot)": scores("bundled", env), "A: tuned on STS-B": scores(model_a, env),
            "A then B, plain": scores(plain, env), "A then B, continual": scores(continual, env)}
    result = {"rows": rows, "settings": vars(args)}
    (out / "forgetting.json").write_text(json.dumps(result, indent=2))
    print("| model | STS-B test Spearman (A) | CNSD test Spearman (B) |\n| --- | --- | --- |")
    for name, s in rows.items():
        print(f"| {name} | {s['A']:.4f} | {s['B']:.4f} |")


if __name__ == "__main__":
    main()
