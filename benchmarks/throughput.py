"""Throughput: `semvec embed` end to end vs sentence-transformers `encode`, same model, same machine.

    .venv/bin/python benchmarks/throughput.py [--rows 10000] [--st-batch-sizes 16,32] [--out FILE]
        [--semvec-args="--dtype bfloat16-mixed" ...] [--rounds N]

Corpus: 80% STS-B sentences (short) and 20% SciFact abstracts (long), shuffled with seed 0, from
../shared/datasets (or SEMVEC_DATASETS). The reference is sentence-transformers `encode` alone at
each batch size (model already loaded, nothing written), the best one kept. semvec is timed end to
end as a user runs it: a fresh process that starts Ray, loads the model, reads the jsonl and
writes parquet. ratio = reference seconds / semvec seconds (> 1: semvec is faster). Each
--semvec-args (repeatable; none: the defaults) is one semvec run against the same reference, and
its vectors are compared row by row with the reference's (least cosine). This machine's speed
drifts by 10% and more within minutes, so --rounds N runs the reference (at its best batch size)
and every semvec run N times, interleaved; each round gives a ratio, and the median is reported.

--st-onnx-int8 PYTHON adds sentence-transformers' ONNX int8 backend to every round, timed the same
way as the float32 reference (benchmarks/st_onnx_int8.py, run by that interpreter: the backend
needs an environment of its own), and each semvec run's ratio to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))


def mixed_corpus(rows: int, seed: int = 0) -> list[str]:
    sentences = []
    for split in ("train", "dev", "test"):
        with open(DATASETS / "stsb" / f"sts-{split}.csv", newline="", encoding="utf-8") as f:
            for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                sentences += [r[5], r[6]]
    with open(DATASETS / "beir_scifact" / "corpus.jsonl", encoding="utf-8") as f:
        abstracts = [(d["title"] + " " + d["text"]).strip() for d in map(json.loads, f)]
    rng = random.Random(seed)
    n_long = rows // 5
    n_short = rows - n_long
    texts = rng.sample(sentences, min(n_short, len(sentences)))
    texts += rng.sample(abstracts, min(n_long, len(abstracts)))
    texts += [rng.choice(sentences) for _ in range(n_short - len(sentences))]  # more than STS-B has: repeat
    while len(texts) < rows:  # more long rows than SciFact has: repeat abstracts
        texts.append(rng.choice(abstracts))
    rng.shuffle(texts)
    return texts


class SentenceTransformersReference:
    """sentence-transformers `encode`, model loaded once; times one pass at a batch size."""

    def __init__(self, threads: int):
        import torch
        from sentence_transformers import SentenceTransformer

        from semvec.models import resolve_model

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(resolve_model("bundled")), device="cpu")

    def time(self, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
        self.model.encode(texts[:64], batch_size=16)  # warm-up
        t = time.perf_counter()
        vectors = self.model.encode(texts, batch_size=batch_size)
        return round(time.perf_counter() - t, 2), vectors


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def least_cosine(output: Path, reference: np.ndarray) -> float:
    from semvec.evaluate import load_vectors

    stored = load_vectors(str(output))
    got = np.stack([stored[str(i)] for i in range(len(reference))])
    return float(cosines(got, reference).min())


def time_semvec(corpus: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "semvec.cli", "embed", str(corpus), str(out), "--id-field", "id", "--json",
           *extra]
    t = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    if result.returncode != 0:
        sys.exit(f"semvec embed failed:\n{result.stderr[-3000:]}")
    return round(seconds, 2), json.loads(result.stdout.strip().splitlines()[-1])


class OnnxInt8Reference:
    """sentence-transformers' ONNX int8 backend in its own environment (st_onnx_int8.py): each call
    is a fresh process that loads the quantised graph (exported once into `cache`) and times one
    encode pass per batch size."""

    def __init__(self, python: str, texts: list[str], cache: Path, threads: int):
        from semvec.models import resolve_model

        self.python, self.cache, self.threads = python, cache, threads
        self.texts = cache / "texts.json"
        cache.mkdir(parents=True, exist_ok=True)
        self.texts.write_text(json.dumps(texts), encoding="utf-8")
        self.model = str(resolve_model("bundled"))

    def time(self, batch_sizes: list[int]) -> tuple[dict[int, float], Path]:
        cmd = [self.python, str(REPO / "benchmarks" / "st_onnx_int8.py"), "--model", self.model,
               "--texts", str(self.texts), "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--out", str(self.cache), "--threads", str(self.threads)]
        result = subprocess.run(cmd, capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            sys.exit(f"sentence-transformers ONNX int8 failed:\n{result.stderr[-3000:]}")
        printed = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
        seconds = {int(k): v for k, v in printed.items()}
        return seconds, self.cache / f"vectors-{min(seconds, key=seconds.get)}.npy"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--st-batch-sizes", default="16,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--semvec-args", action="append",
                    help="flags for one semvec embed run; repeat for more runs (default: one, no flags)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats; the median ratio is kept")
    ap.add_argument("--out", help="append the JSON result to this file")
    ap.add_argument("--st-onnx-int8", metavar="PYTHON",
                    help="also time sentence-transformers' ONNX int8 backend with this interpreter")
    args = ap.parse_args()

    texts = mixed_corpus(args.rows)
    runs = args.semvec_args or [""]
    machine = f"{os.cpu_count()} CPU, {platform.processor() or platform.machine()}"
    reference = SentenceTransformersReference(args.threads)
    st_first = {}
    for bs in (int(b) for b in args.st_batch_sizes.split(",")):
        st_first[bs], vectors = reference.time(texts, bs)
    best_bs = min(st_first, key=st_first.get)
    st_rounds = [st_first[best_bs]]
    semvec_rounds: list[list[float]] = [[] for _ in runs]
    least: list[float] = [1.0 for _ in runs]
    onnx_rounds: list[float] = []
    onnx = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "mixed.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
        if args.st_onnx_int8:
            int8 = OnnxInt8Reference(args.st_onnx_int8, texts, Path(tmp) / "onnx-int8", args.threads)
            first, path = int8.time([int(b) for b in args.st_batch_sizes.split(",")])
            onnx_bs = min(first, key=first.get)
            onnx_rounds.append(first[onnx_bs])
            least_int8 = cosines(np.load(path), vectors)
            onnx = {"st_onnx_int8_first_pass_s": first, "st_onnx_int8_best_batch": onnx_bs,
                    "st_onnx_int8_least_cosine_to_st": round(float(least_int8.min()), 7)}
        for r in range(args.rounds):
            if r:
                st_rounds.append(reference.time(texts, best_bs)[0])
                if args.st_onnx_int8:
                    onnx_rounds.append(int8.time([onnx_bs])[0][onnx_bs])
            for n, extra in enumerate(runs):
                out = Path(tmp) / f"out-{n}"
                shutil.rmtree(out, ignore_errors=True)
                seconds, summary = time_semvec(corpus, out, extra.split())
                assert summary["embedded"] == args.rows, summary
                semvec_rounds[n].append(seconds)
                least[n] = min(least[n], least_cosine(out, vectors))
                print(f"round {r + 1}: sentence-transformers {st_rounds[-1]} s"
                      + (f", its ONNX int8 {onnx_rounds[-1]} s" if onnx_rounds else "")
                      + f", semvec [{extra}] {seconds} s", flush=True)
    for n, extra in enumerate(runs):
        ratios = [round(a / b, 3) for a, b in zip(st_rounds, semvec_rounds[n], strict=True)]
        result = {
            "rows": args.rows, "machine": machine, "semvec_args": extra,
            "sentence_transformers_first_pass_s": st_first, "st_best_batch": best_bs,
            "sentence_transformers_s": st_rounds, "semvec_end_to_end_s": semvec_rounds[n],
            "ratios": ratios, "ratio": statistics.median(ratios),
            "least_cosine_to_st": round(least[n], 7),
        }
        if onnx_rounds:
            int8_ratios = [round(a / b, 3) for a, b in zip(onnx_rounds, semvec_rounds[n], strict=True)]
            result.update(onnx, st_onnx_int8_s=onnx_rounds, ratios_to_st_onnx_int8=int8_ratios,
                          ratio_to_st_onnx_int8=statistics.median(int8_ratios),
                          st_onnx_int8_vs_st=statistics.median(
                              round(a / b, 3) for a, b in zip(st_rounds, onnx_rounds, strict=True)))
        print(json.dumps(result, indent=2), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
