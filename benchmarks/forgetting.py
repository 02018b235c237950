"""Forgetting: tune on task A, then on task B with and without continual learning.

    .venv/bin/python benchmarks/forgetting.py [--b cnsd|scifact] [--model-a DIR] [--epochs-a N]
                                              [--epochs-b N] [--from-bundled] [--dev-corpus] [--out DIR]
                                              [--hard-negatives DEPTH] [--train-args ARGS] [--dev-only]
                                              [--score MODEL] [--dev-split MODEL]

A = STS-B (English), scored by test Spearman. B, from ../shared/datasets (or SEMVEC_DATASETS):
- cnsd: CNSD (Chinese STS-B), the sts task, test Spearman; checkpoints chosen on CNSD dev.
- scifact: BEIR SciFact, the pairs task on train claims and the abstracts they cite (title + text),
  test nDCG@10 of `semvec evaluate retrieval`; checkpoints chosen on a seeded 10% of the train
  claims (seed 0; a claim's pairs stay on one side), SciFact has no dev split.
Model A is the bundled model tuned on STS-B train (--epochs-a, default the trainer's; or --model-a,
e.g. the stsb-full model benchmarks/quality.py wrote). From A, two runs on B: plain, and continual
(past A data replayed at replay_share 0.5 and distillation toward A at weight 1.0, the retraining
defaults; --l2sp/--ewc add those terms). The replay data must be of B's task: for cnsd it is STS-B
train; for scifact, STS-B train pairs scored 4 or more, as anchor/positive pairs. --from-bundled
adds B tuned from the bundled model (domain tuning without A); --domain-only runs that alone.
Every model is scored once on both test splits. The table goes to stdout and DIR/forgetting.json.

For choosing settings on dev (scifact): --dev-only trains and prints each run's dev metrics (its
chosen checkpoint's, from `semvec train`) and scores no test split; --score MODEL then scores the
one chosen model on both test splits, once. --hard-negatives DEPTH gives each train pair a mined
negative: a seeded pick among the bundled model's top DEPTH corpus documents for its claim that
the claim does not cite (semvec embed, index and search; train claims and the corpus only).
--train-args passes more `semvec train` flags to the B runs (e.g. "--lr 5e-5").
--dev-split MODEL scores MODEL on the dev claims in two groups: those citing only documents that no
tuning claim cites, and the rest (what tuning does to documents it never saw, without test).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import sys
from pathlib import Path

from commands import semvec  # benchmarks/commands.py

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))
A = {s: DATASETS / "stsb" / f"sts-{s}.csv" for s in ("train", "dev", "test")}
CNSD = {s: DATASETS / "zh_similarity" / "cnsd_stsb" / f"cnsd-sts-{s}.txt" for s in ("train", "dev", "test")}
SCIFACT = DATASETS / "beir_scifact"


def scifact_qrels(split: str) -> dict[str, list[tuple[str, str]]]:
    """query id -> its (document id, score) judgements, in the file's order."""
    judged: dict[str, list[tuple[str, str]]] = {}
    with open(SCIFACT / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, doc, score = line.rstrip("\n").split("\t")
            judged.setdefault(qid, []).append((doc, score))
    return judged


def scifact_files(out: Path, env: dict, negatives_depth: int = 0) -> dict:
    """Pairs of train claims and cited abstracts, split by claim (seeded 10% to dev). With
    negatives_depth, each train pair also gets a mined hard negative (mine_negatives)."""
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        docs = {str(d["_id"]): (str(d.get("title") or "") + " " + str(d.get("text") or "")).strip()
                for d in map(json.loads, f)}
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        claims = {str(q["_id"]): q["text"] for q in map(json.loads, f)}
    cited = {q: [d for d, _ in judged] for q, judged in scifact_qrels("train").items()}
    train_ids, dev_ids = scifact_dev_claims(cited)
    negatives = (mine_negatives(out, docs, {q: claims[q] for q in train_ids}, cited, negatives_depth, env)
                 if negatives_depth else {})
    files = {}
    for split, chosen in (("train", train_ids), ("dev", dev_ids)):
        rows = []
        for q in chosen:
            for d in cited[q]:
                rows.append({"anchor": claims[q], "positive": docs[d]})
                if (q, d) in negatives:
                    rows[-1]["negative"] = docs[negatives[q, d]]
        files[split] = out / f"scifact-{split}-pairs.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def scifact_dev_claims(cited: dict) -> tuple[list[str], list[str]]:
    """(train, dev) claim ids of SciFact's train split: a seeded 10% of the claims held out as dev."""
    ids = sorted(cited)
    dev = set(random.Random(0).sample(ids, round(0.1 * len(ids))))
    return [q for q in ids if q not in dev], sorted(dev)


def mine_negatives(out: Path, docs: dict, claims: dict, cited: dict, depth: int, env: dict) -> dict:
    """One hard negative per (train claim, cited document): a seeded pick among the bundled model's
    top `depth` documents for the claim that the claim does not cite. Mined with semvec itself
    (embed the corpus, an exact index, a batch search); only train claims and the corpus are read."""
    mine = out / "mining"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(parents=True)
    for name, texts in (("docs", docs), ("claims", claims)):
        (mine / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                    for i, t in texts.items()))
    semvec("embed", str(mine / "docs.jsonl"), str(mine / "vectors"), "--id-field", "id", env=env)
    semvec("index", str(mine / "vectors"), str(mine / "index"), "--kind", "exact", env=env)
    semvec("search", str(mine / "index"), "--queries", str(mine / "claims.jsonl"), "--id-field", "id",
           "--output", str(mine / "hits.jsonl"), "-k", str(depth), env=env)
    rng = random.Random(0)
    negatives = {}
    with open(mine / "hits.jsonl", encoding="utf-8") as f:
        hits = {str(h["query_id"]): [str(i) for i in h["ids"]] for h in map(json.loads, f)}
    for q in sorted(claims):
        pool = [d for d in hits[q] if d not in cited[q]]
        for d in cited[q]:
            if pool:
                negatives[q, d] = rng.choice(pool)
    return negatives


def sts_as_pairs(out: Path, least: float = 4.0) -> Path:
    """STS-B train pairs scored `least` or more, as anchor/positive pairs (replay for a pairs task)."""
    path = out / "stsb-train-pairs.jsonl"
    with open(A["train"], encoding="utf-8") as f, open(path, "w", encoding="utf-8") as w:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7 and float(row[4]) >= least:
                w.write(json.dumps({"anchor": row[5], "positive": row[6]}) + "\n")
    return path


def train(out: Path, task: str, data: dict, model: str, env: dict, extra: list[str]) -> str:
    """Train one model to `out`; its summary (with the chosen checkpoint's dev metrics under "best")
    goes to out/../NAME.summary.json beside it."""
    for stale in (out, Path(f"{out}-checkpoints")):  # a same-named run would resume
        shutil.rmtree(stale, ignore_errors=True)
    summary = semvec("train", "--task", task, "--method", "full", "--train", str(data["train"]), "--dev",
           str(data["dev"]), "--output", str(out), "--model", model, "--name", out.name, *extra, env=env)
    print(f"{out.name}: dev {summary['best']}", flush=True)
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=2))
    return str(out)


def scores(model: str, b: str, env: dict, dev_only: bool = False) -> dict:
    if dev_only:
        summary = Path(f"{model}.summary.json")
        return json.loads(summary.read_text())["best"] if summary.exists() else {}
    a = semvec("evaluate", "sts", "--model", model, "--data", str(A["test"]), env=env)["spearman"]
    if b == "cnsd":
        b = semvec("evaluate", "sts", "--model", model, "--data", str(CNSD["test"]), env=env)
        b_score = b["spearman"]
    else:
        b_score = semvec("evaluate", "retrieval", "--model", model, "--corpus", str(SCIFACT / "corpus.jsonl"),
                         "--queries", str(SCIFACT / "queries.jsonl"),
                         "--qrels", str(SCIFACT / "qrels" / "test.tsv"), env=env)["ndcg@10"]
    return {"A": round(a, 4), "B": round(b_score, 4)}


def scifact_seen_split(model: str, out: Path, env: dict, split: str = "test") -> dict:
    """SciFact nDCG@10 over two sets of claims: those citing only documents that no tuning claim
    cites, and those citing at least one that a tuning claim cites (tuning on its pairs has then
    seen that document as a positive). split "test": the test claims, against every train claim's
    documents (most test documents are cited in train too); split "dev": the held-out 10% of the
    train claims (scifact_dev_claims), against the other 90%'s documents, so that a choice can be
    made on dev without reading test."""
    if split == "test":
        judged = scifact_qrels("test")
        seen = {doc for cited in scifact_qrels("train").values() for doc, _ in cited}
    else:
        train = scifact_qrels("train")
        tuning, dev = scifact_dev_claims(train)
        judged = {q: train[q] for q in dev}
        seen = {doc for q in tuning for doc, _ in train[q]}
    cites_seen = {q: any(d in seen for d, _ in c) for q, c in judged.items()}
    groups = {"cites_only_unseen_documents": [q for q in judged if not cites_seen[q]],
              "cites_a_train_cited_document": [q for q in judged if cites_seen[q]]}
    result = {}
    for name, claims in groups.items():
        path = out / f"qrels-{split}-{name}.tsv"
        path.write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{score}\n" for q in claims for d, score in judged[q]))
        metrics = semvec("evaluate", "retrieval", "--model", model, "--corpus", str(SCIFACT / "corpus.jsonl"),
                         "--queries", str(SCIFACT / "queries.jsonl"), "--qrels", str(path), env=env)
        result[name] = {"claims": len(claims), "ndcg@10": round(metrics["ndcg@10"], 4),
                        "mrr@10": round(metrics["mrr@10"], 4)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", choices=("cnsd", "scifact"), default="cnsd", help="task B")
    ap.add_argument("--model-a", help="a model already tuned on STS-B (default: train one)")
    ap.add_argument("--epochs-a", type=int, default=None, help="epochs on A (default: the train default)")
    ap.add_argument("--epochs-b", type=int, default=None, help="epochs on B (default: the train default)")
    ap.add_argument("--from-bundled", action="store_true", help="also B tuned from the bundled model")
    ap.add_argument("--domain-only", action="store_true",
                    help="only B tuned from the bundled model (no A, no forgetting runs)")
    ap.add_argument("--no-zero-shot", action="store_true", help="leave the bundled model's row out")
    ap.add_argument("--dev-corpus", action="store_true",
                    help="scifact: the dev claims rank the whole SciFact corpus beside their abstracts "
                         "(train --dev-corpus), as the test claims do; the test split stays unread")
    ap.add_argument("--hard-negatives", type=int, default=0, metavar="DEPTH",
                    help="scifact: give each train pair a negative picked (seeded) among the bundled "
                         "model's top DEPTH documents for its claim that the claim does not cite")
    ap.add_argument("--train-args", default="", help="more `semvec train` flags for the B runs, "
                    "e.g. \"--lr 5e-5 --batch-size 32\"")
    ap.add_argument("--dev-only", action="store_true",
                    help="train and print the dev metrics only: no test split is scored (for choosing "
                         "settings; score the chosen model once afterwards)")
    ap.add_argument("--score", metavar="MODEL", help="only score this model on both test splits "
                    "(the once-at-the-end test of a model chosen with --dev-only)")
    ap.add_argument("--dev-split", metavar="MODEL", help="only score this model on the SciFact dev claims, "
                    "split by whether they cite a document the tuning claims cite (no test split read)")
    ap.add_argument("--l2sp", type=float, default=0.0)
    ap.add_argument("--ewc", type=float, default=0.0)
    ap.add_argument("--distill", type=float, default=1.0)
    ap.add_argument("--replay-share", type=float, default=0.5)
    ap.add_argument("--out", default=str(REPO / "out" / "forgetting"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    if args.dev_split:
        print(json.dumps({args.dev_split: scifact_seen_split(args.dev_split, out, env, "dev")}))
        return
    if args.score:
        result = scores(args.score, args.b, env)
        if args.b == "scifact":
            result["B_by_test_claim"] = scifact_seen_split(args.score, out, env)
        print(json.dumps({args.score: result}))
        return
    if args.b == "cnsd":
        task, b_data, replay = "sts", CNSD, A["train"]
    else:
        task, b_data, replay = "pairs", scifact_files(out, env, args.hard_negatives), sts_as_pairs(out)
    epochs_a = ["--epochs", str(args.epochs_a)] if args.epochs_a else []
    extra = (["--epochs", str(args.epochs_b)] if args.epochs_b else []) + shlex.split(args.train_args)
    if args.dev_corpus:
        if args.b != "scifact":
            sys.exit("--dev-corpus is for --b scifact (a pairs task)")
        extra += ["--dev-corpus", str(SCIFACT / "corpus.jsonl")]
    zero_shot = args.no_zero_shot or args.dev_only
    rows = {} if zero_shot else {"bundled (zero-shot)": scores("bundled", args.b, env)}
    if args.from_bundled or args.domain_only:
        tuned = train(out / "model-b-from-bundled", task, b_data, "bundled", env, extra)
        rows["bundled then B (domain tuning)"] = scores(tuned, args.b, env, args.dev_only)
    if not args.domain_only:
        model_a = args.model_a or train(out / "model-a", "sts", A, "bundled", env, epochs_a)
        rows["A: tuned on STS-B"] = scores(model_a, args.b, env, args.dev_only)
        plain = train(out / "model-b-plain", task, b_data, model_a, env, extra)
        rows["A then B, plain"] = scores(plain, args.b, env, args.dev_only)
        continual = train(out / "model-b-continual", task, b_data, model_a, env, extra + [
            "--replay", str(replay), "--replay-share", str(args.replay_share), "--distill",
            str(args.distill), "--l2sp", str(args.l2sp), "--ewc", str(args.ewc)])
        rows["A then B, continual"] = scores(continual, args.b, env, args.dev_only)
    result = {"rows": rows, "settings": vars(args)}
    (out / "forgetting.json").write_text(json.dumps(result, indent=2))
    if args.dev_only:
        print(json.dumps(rows, indent=2))
        return
    b_name = "CNSD test Spearman" if args.b == "cnsd" else "SciFact test nDCG@10"
    print(f"| model | STS-B test Spearman (A) | {b_name} (B) |\n| --- | --- | --- |")
    for name, s in rows.items():
        print(f"| {name} | {s['A']:.4f} | {s['B']:.4f} |")


if __name__ == "__main__":
    main()
