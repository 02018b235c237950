"""Static models and word vectors: `semvec distill` of the bundled model, its quality, its speed,
and `semvec words` on word-similarity benchmarks. One JSON line per measurement on stdout.

    flock /tmp/semvec-test.lock .venv/bin/python benchmarks/static.py [--rows 3000] [--dims 256]
        [--out FILE]

1. distil: every token of the bundled model's vocabulary through it, once per framing (see
   semvec.distill.Frame); then, for each framing x Zipf coefficient, PCA + weights and STS-B *dev*
   Spearman. The best on dev is kept, written as a static model directory, and scored once on
   STS-B test, beside the transformer's own test score (MEASURED.md: 0.8203; model2vec's
   distillation of this model: 0.6608). STS-B train is not used: distillation learns from no
   labelled data, and there is nothing to fit on it.
2. speed, the same rows of the mixed corpus (80% STS-B sentences, 20% SciFact abstracts, seed 0,
   as benchmarks/throughput.py): sentence-transformers `encode` of the static directory and of
   the transformer (model loaded, nothing written), semvec's Encoder on the static directory
   (in-process, tokenize + lookup), and `semvec embed` end to end (a fresh process: Ray start,
   read, write) on each model; the static backfill's vectors are compared with
   sentence-transformers' (least cosine).
3. words: `semvec words` vectors from the transformer and from the static model on WordSim-353
   (Finkelstein et al. 2002, "Placing search in context: the concept revisited") and SimLex-999
   (Hill, Reichart, Korhonen 2015, "SimLex-999: Evaluating semantic models with (genuine)
   similarity estimation"), both as shipped in gensim's test data; Spearman of cosine vs the
   human score, by gensim's KeyedVectors.evaluate_word_pairs on the word2vec files.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DATASETS, mixed_corpus  # noqa: E402

ZIPF = (0.0, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)  # 0: no weighting


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def static_embedder(table: np.ndarray, tokenizer):
    from semvec.config import Pooling
    from semvec.static import STATIC_MAX_LENGTH, StaticTable
    from semvec.tokens import tokenize

    lookup = StaticTable(table)

    def embed(texts: list[str]) -> np.ndarray:
        return lookup.encode(tokenize(tokenizer, texts, STATIC_MAX_LENGTH).ids, Pooling.MEAN, True)[0]

    return embed


def distil(dims: int, out_dir: Path, out: str | None) -> None:
    from semvec import models
    from semvec.distill import Frame, base_encoder, check_dims, placeholders, static_vectors, token_vectors
    from semvec.evaluate import evaluate_sts
    from semvec.static import static_tokenizer

    model_dir = models.resolve_model("bundled")
    check_dims(dims, model_dir)
    encoder = base_encoder(model_dir)
    live = ~placeholders(encoder.tokenizer)
    tokenizer = static_tokenizer(encoder.tokenizer)
    dev = str(DATASETS / "stsb" / "sts-dev.csv")
    raw, pass_s, scores = {}, {}, {}
    for frame in Frame:
        t = time.perf_counter()
        raw[frame] = token_vectors(encoder, frame, live)
        pass_s[frame] = time.perf_counter() - t
        for zipf in ZIPF:
            table = static_vectors(raw[frame], live, dims, zipf)
            scores[(frame, zipf)] = evaluate_sts(static_embedder(table, tokenizer), dev)["spearman"]
            emit({"stage": "dev", "split": "sts-dev", "dims": dims, "frame": frame.value, "zipf": zipf,
                  "spearman": round(scores[(frame, zipf)], 4)}, out)
    frame, zipf = max(scores, key=scores.get)
    # The static model measured below is made by the command a user runs, with the choice.
    cmd = [sys.executable, "-m", "semvec.cli", "distill", "--model", "bundled", "--output", str(out_dir),
           "--dims", str(dims), "--frame", frame.value, "--zipf", str(zipf), "--json"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"semvec distill failed:\n{done.stderr[-3000:]}")
    emit({"stage": "choice", "dims": dims, "frame": frame.value, "zipf": zipf,
          "dev_spearman": round(scores[(frame, zipf)], 4), "token_pass_s": round(pass_s[frame], 1),
          "semvec_distill_s": round(time.perf_counter() - t, 1),
          "vocabulary": int(len(live)), "placeholders": int((~live).sum())}, out)


def test_scores(static_dir: Path, out: str | None) -> None:
    from semvec.evaluate import evaluate_sts, model_embedder

    test = str(DATASETS / "stsb" / "sts-test.csv")
    for name, ref in (("static", str(static_dir)), ("transformer", "bundled")):
        t = time.perf_counter()
        r = evaluate_sts(model_embedder(ref), test)
        emit({"stage": "test", "split": "sts-test", "model": name, "pairs": r["pairs"],
              "spearman": round(r["spearman"], 4), "seconds": round(time.perf_counter() - t, 1)}, out)


def speed(static_dir: Path, rows: int, tmp: Path, out: str | None) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from semvec.encode import Encoder
    from semvec.evaluate import load_vectors
    from semvec.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    texts = mixed_corpus(rows)
    corpus = tmp / "mixed.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    base = {"stage": "speed", "rows": rows, "cpus": os.cpu_count()}
    reference = None
    runs = (("static", str(static_dir), 1024), ("transformer", str(resolve_model("bundled")), 16))
    for name, model, batch in runs:
        st = SentenceTransformer(model, device="cpu")
        st.encode(texts[:64], batch_size=16)  # warm-up
        t = time.perf_counter()
        vectors = st.encode(texts, batch_size=batch)
        seconds = time.perf_counter() - t
        reference = vectors if name == "static" else reference
        emit({**base, "run": f"sentence-transformers {name}", "batch_size": batch,
              "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}, out)
    enc = Encoder(static_dir)
    enc.encode_texts(texts[:64])
    t = time.perf_counter()
    enc.encode_texts(texts)
    seconds = time.perf_counter() - t
    emit({**base, "run": "semvec Encoder static (in-process: tokenize + lookup)",
          "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}, out)
    for name, model in (("static", str(static_dir)), ("transformer", "bundled")):
        target = tmp / f"out-{name}"
        cmd = [sys.executable, "-m", "semvec.cli", "embed", str(corpus), str(target), "--model", model,
               "--id-field", "id", "--json"]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t
        if done.returncode != 0:
            sys.exit(f"semvec embed ({name}) failed:\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        record = {**base, "run": f"semvec embed {name} (end to end, fresh process)",
                  "seconds": round(wall, 2), "rows_per_s": round(rows / wall, 1),
                  "job_seconds": summary["seconds"], "job_rows_per_s": summary["rows_per_s"],
                  "embedded": summary["embedded"]}
        if name == "static":
            stored = load_vectors(str(target))
            got = np.stack([stored[str(i)] for i in range(rows)])
            cos = (got * reference).sum(1) / np.clip(
                np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1), 1e-12, None)
            record["least_cosine_to_sentence_transformers"] = round(float(cos.min()), 6)
        emit(record, out)


def words(static_dir: Path, tmp: Path, out: str | None) -> None:
    import gensim
    from gensim.models import KeyedVectors

    from semvec.words import export_words, load_words_config

    data = Path(gensim.__file__).parent / "test" / "test_data"
    benchmarks = {"WordSim-353": data / "wordsim353.tsv", "SimLex-999": data / "simlex999.txt"}
    vocab = set()
    for path in benchmarks.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#"):
                vocab |= set(line.split("\t")[:2])
    (tmp / "words.txt").write_text("\n".join(sorted(vocab)) + "\n")
    for name, model in (("transformer", "bundled"), ("static", str(static_dir))):
        target = tmp / f"words-{name}.txt"
        summary = export_words(load_words_config(model=model, vocab=str(tmp / "words.txt"),
                                                 output=str(target)))
        kv = KeyedVectors.load_word2vec_format(str(target))
        for bench, path in benchmarks.items():
            pearson, spearman, oov = kv.evaluate_word_pairs(str(path), delimiter="\t")
            emit({"stage": "words", "model": name, "benchmark": bench, "source": str(path.name),
                  "spearman": round(float(spearman[0]), 4), "pearson": round(float(pearson[0]), 4),
                  "oov_percent": round(float(oov), 2), "words": summary["words"],
                  "seconds": summary["seconds"]}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3000, help="rows of the mixed corpus for speed")
    ap.add_argument("--dims", type=int, default=256, help="PCA dimensions of the static model")
    ap.add_argument("--out", help="also append every JSON line to this file")
    args = ap.parse_args()
    if not (DATASETS / "stsb").is_dir():
        sys.exit(f"datasets not found at {DATASETS}; set SEMVEC_DATASETS")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="semvec-static-bench-") as tmp:
        static_dir = Path(tmp) / "static"
        distil(args.dims, static_dir, args.out)
        test_scores(static_dir, args.out)
        speed(static_dir, args.rows, Path(tmp), args.out)
        words(static_dir, Path(tmp), args.out)


if __name__ == "__main__":
    main()
