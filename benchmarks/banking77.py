"""Customer-service search on BANKING77: a customer's question finds the answer entry of its intent.

    .venv/bin/python benchmarks/banking77.py [--model bundled] [--out DIR] [--limit-test N]
                                             [--tune] [--classify]

End to end with the semvec commands, as the README's walk-through runs them:
1. the 77 answer entries (samples/banking77/answers.jsonl, one per intent) are embedded
   (`semvec embed`) and indexed (`semvec index`, exact);
2. the test queries are answered (`semvec search --queries`): accuracy@1 (the first answer is the
   query's intent) and MRR@10 of the intent's entry;
3. beside it, kNN over the train queries: their vectors indexed, each test query takes the intent
   of its nearest train query (kNN@1).
--tune: `semvec train --task pairs --method full` (the defaults, but --tune-epochs) on the train
queries, each against its intent's answer entry, the checkpoint chosen on a seeded 10% of train
(the trainer's default); then 1-3 again with the tuned model. --classify: `semvec train --task
classification --method full` on the train queries (chosen on the same kind of seeded slice),
scored once with `semvec evaluate classification` on test.

Data from ../shared/datasets/banking77 (or SEMVEC_DATASETS): CSV `text,category`, read with a CSV
parser (some texts hold line breaks). Nothing is fitted or chosen on the test split. --limit-test N
keeps the first N test queries (a smoke run). Runs are tracked in a throw-away MLflow store under
--out. Prints one JSON line; work files go under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from commands import semvec  # benchmarks/commands.py

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets")) / "banking77"
ANSWERS = REPO / "samples" / "banking77" / "answers.jsonl"


def read_split(name: str) -> list[dict]:
    with open(DATA / f"{name}.csv", newline="", encoding="utf-8") as f:
        return [{"id": f"{name}-{i:05d}", "text": r["text"], "intent": r["category"]}
                for i, r in enumerate(csv.DictReader(f))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def scores(answers: Path, truth: dict[str, str], to_intent: dict[str, str] | None = None) -> dict:
    """accuracy@1 and MRR@10 of each query's intent among its ranked ids (mapped to intents)."""
    hits, rr = 0, 0.0
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    for line in lines:
        intents = [to_intent[i] if to_intent else i for i in line["ids"]]
        want = truth[line["query_id"]]
        hits += intents[:1] == [want]
        rank = next((r for r, i in enumerate(intents[:10]) if i == want), None)
        rr += 0.0 if rank is None else 1.0 / (rank + 1)
    return {"queries": len(lines), "accuracy@1": round(hits / len(lines), 4),
            "mrr@10": round(rr / len(lines), 4)}


def search_rows(model: str, out: Path, train: list[dict], queries: Path, truth: dict[str, str]) -> dict:
    """Steps 1-3 with one model: answer-entry search and kNN over the train queries."""
    out.mkdir(parents=True, exist_ok=True)
    semvec("embed", str(ANSWERS), str(out / "answer-vectors"), "--model", model, "--id-field", "id",
           "--overwrite")
    semvec("index", str(out / "answer-vectors"), str(out / "answer-index"), "--overwrite")
    semvec("search", str(out / "answer-index"), "--queries", str(queries), "--id-field", "id",
           "--output", str(out / "answers.jsonl"), "-k", "10")
    rows = {"answer_entries": scores(out / "answers.jsonl", truth)}
    train_file = write_jsonl(out / "train.jsonl", train)  # no test query is indexed
    semvec("embed", str(train_file), str(out / "train-vectors"), "--model", model, "--id-field", "id",
           "--overwrite")
    semvec("index", str(out / "train-vectors"), str(out / "train-index"), "--overwrite")
    semvec("search", str(out / "train-index"), "--queries", str(queries), "--id-field", "id",
           "--output", str(out / "neighbours.jsonl"), "-k", "10")
    rows["knn_train_queries"] = scores(out / "neighbours.jsonl", truth, {r["id"]: r["intent"] for r in train})
    return rows


def train(task: str, data: Path, output: Path, epochs: int | None) -> dict:
    """`semvec train` from the defaults but --epochs (dev: the trainer's seeded 10% of train)."""
    for stale in (output, output.parent / f"{output.name}-checkpoints"):
        shutil.rmtree(stale, ignore_errors=True)
    t = time.time()
    summary = semvec("train", "--task", task, "--method", "full", "--train", str(data),
                     "--output", str(output), "--name", f"banking77-{task}-{int(time.time())}",
                     *(["--epochs", str(epochs)] if epochs else []))
    return {"train_seconds": round(time.time() - t, 1),
            "dev": {k: round(v, 4) for k, v in summary["best"].items() if k.startswith("dev_")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--out", default="/tmp/semvec-banking77")
    ap.add_argument("--limit-test", type=int)
    ap.add_argument("--no-zero-shot", action="store_true", help="leave the bundled model's rows out")
    ap.add_argument("--tune", action="store_true", help="also the pairs-tuned model's rows")
    ap.add_argument("--classify", action="store_true", help="also the classification task's accuracy")
    ap.add_argument("--tune-epochs", type=int, help="epochs of the pairs run (default: the trainer's)")
    ap.add_argument("--classify-epochs", type=int,
                    help="epochs of the classification run (default: the trainer's)")
    args = ap.parse_args()
    if not (DATA / "test.csv").exists():
        sys.exit(f"BANKING77 not found at {DATA}: set SEMVEC_DATASETS")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"  # a throw-away store
    train_rows, test = read_split("train"), read_split("test")[:args.limit_test]
    truth = {r["id"]: r["intent"] for r in test}
    queries = write_jsonl(out / "test.jsonl", test)
    result: dict = {"model": args.model, "test_queries": len(test)}
    t0 = time.time()
    if not args.no_zero_shot:
        result["zero_shot"] = search_rows(args.model, out / "zero-shot", train_rows, queries, truth)
    if args.tune:
        entry = {e["id"]: e["text"] for e in map(json.loads, ANSWERS.read_text().splitlines())}
        pairs = write_jsonl(out / "pairs-train.jsonl",
                            [{"anchor": r["text"], "positive": entry[r["intent"]]} for r in train_rows])
        result["tuned"] = train("pairs", pairs, out / "model-pairs", args.tune_epochs)
        tuned = search_rows(str(out / "model-pairs"), out / "tuned", train_rows, queries, truth)
        result["tuned"].update(tuned)
    if args.classify:
        labelled = write_jsonl(out / "classification-train.jsonl",
                               [{"text": r["text"], "label": r["intent"]} for r in train_rows])
        result["classification"] = train("classification", labelled, out / "model-classification",
                                         args.classify_epochs)
        test_file = write_jsonl(out / "classification-test.jsonl",
                                [{"text": r["text"], "label": r["intent"]} for r in test])
        scored = semvec("evaluate", "classification", "--model", str(out / "model-classification"),
                        "--data", str(test_file))
        result["classification"]["test"] = {k: round(v, 4) for k, v in scored.items() if isinstance(v, float)}
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
