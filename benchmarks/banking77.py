"""Customer-service search on BANKING77: a customer's question finds the answer entry of its intent.

    .venv/bin/python benchmarks/banking77.py [--model bundled] [--out DIR] [--limit-test N]

End to end with the semvec commands, as the README's walk-through runs them:
1. the 77 answer entries (samples/banking77/answers.jsonl, one per intent) are embedded
   (`semvec embed`) and indexed (`semvec index`, exact);
2. the test queries are answered (`semvec search --queries`): accuracy@1 (the first answer is the
   query's intent) and MRR@10 of the intent's entry;
3. beside it, kNN over the train queries: their vectors indexed, each test query takes the intent
   of its nearest train query (kNN@1).

Data from ../shared/datasets/banking77 (or SEMVEC_DATASETS): CSV `text,category`, read with a CSV
parser (some texts hold line breaks). Nothing is fitted on the test split. --limit-test N keeps the
first N test queries (a smoke run). Prints one JSON line; work files go under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets")) / "banking77"


def read_split(name: str) -> list[dict]:
    with open(DATA / f"{name}.csv", newline="", encoding="utf-8") as f:
        return [{"id": f"{name}-{i:05d}", "text": r["text"], "intent": r["category"]}
                for i, r in enumerate(csv.DictReader(f))]


def semvec(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "semvec.cli", *args, "--json"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"semvec {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--out", default="/tmp/semvec-banking77")
    ap.add_argument("--limit-test", type=int)
    args = ap.parse_args()
    if not (DATA / "test.csv").exists():
        sys.exit(f"BANKING77 not found at {DATA}: set SEMVEC_DATASETS")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = read_split("train"), read_split("test")[:args.limit_test]
    truth = {r["id"]: r["intent"] for r in test}
    queries = write_jsonl(out / "test.jsonl", test)
    result = {"model": args.model, "test_queries": len(test)}
    t0 = time.time()

    # 1-2: answer entries, indexed, then the test queries answered
    semvec("embed", str(REPO / "samples" / "banking77" / "answers.jsonl"), str(out / "answer-vectors"),
           "--model", args.model, "--id-field", "id", "--overwrite")
    semvec("index", str(out / "answer-vectors"), str(out / "answer-index"), "--overwrite")
    semvec("search", str(out / "answer-index"), "--queries", str(queries), "--id-field", "id",
           "--output", str(out / "answers.jsonl"), "-k", "10")
    result["answer_entries"] = scores(out / "answers.jsonl", truth)

    # 3: kNN over the train queries (no test query is indexed)
    write_jsonl(out / "train.jsonl", train)
    semvec("embed", str(out / "train.jsonl"), str(out / "train-vectors"), "--model", args.model,
           "--id-field", "id", "--overwrite")
    semvec("index", str(out / "train-vectors"), str(out / "train-index"), "--overwrite")
    semvec("search", str(out / "train-index"), "--queries", str(queries), "--id-field", "id",
           "--output", str(out / "neighbours.jsonl"), "-k", "10")
    result["knn_train_queries"] = scores(out / "neighbours.jsonl", truth,
                                         {r["id"]: r["intent"] for r in train})
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
