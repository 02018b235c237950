"""GPU throughput and model FLOPs utilisation: `semvec embed` end to end vs sentence-transformers fp16.

    .venv/bin/python benchmarks/gpu.py [--rows 100000] [--model bundled] [--st-batch-sizes 64,128,256]
        [--semvec-args="--dtype bfloat16" ...] [--peak-tflops X] [--out DIR]

One command for a lent GPU (`device` in the tool library), on the mixed corpus of
benchmarks/throughput.py (80% STS-B sentences, 20% SciFact abstracts, seed 0):
- sentence-transformers `encode` in fp16 (`model.half()`), model loaded once, at each batch size
  (the best kept): the reference;
- `semvec embed` as a user runs it, a fresh process (Ray start, model load, jsonl read, parquet
  written), once per --semvec-args (repeatable; none: the defaults and `--dtype bfloat16`, and on
  a GPU also two actors sharing it; on a GPU each run asks for `--num-gpus-per-worker 1` unless
  its flags say otherwise, since Ray hides the GPU from actors that do not ask).
Each run reports rows/s and tokens/s (the corpus's tokens after truncation at the model's limit, no
padding), the model's FLOPs over the corpus (forward only: 2 x the non-embedding parameters per
token plus attention's 4 x layers x length x hidden per token, each text at its own length), hence
achieved TFLOP/s and MFU against the GPU's dense bf16/fp16 peak (--peak-tflops, or the table below
for a known GPU). The least cosine of semvec's vectors to the fp16 reference is printed beside.

On a lent GPU machine (no network, no Ray, 64 MiB a call), benchmarks/device_kit.py packs what it
lacks and says which calls run it (benchmarks/device_gpu.sh). It runs on CPU too (no MFU without
--peak-tflops): the smoke test in tests/test_benchmarks.py runs
it with a tiny model on a few rows. Prints one JSON line per run and a markdown table; the
numbers go to RESULTS.md only from a real GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from throughput import least_cosine, mixed_corpus, time_semvec  # noqa: E402  (a script beside this one)

# dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
               "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def padding_share(lengths: np.ndarray, rows: int | None = None) -> float:
    """Share of the token slots that semvec's GPU forward passes spend on padding for texts of
    these lengths: each Ray batch (`rows` rows, default a GPU actor's GPU_BATCH_ROWS, in corpus
    order) sorted by length and cut into GPU_BATCH budgets, as an encoder actor does."""
    from semvec.config import GPU_BATCH_ROWS
    from semvec.encode import GPU_BATCH, pack

    rows = rows or GPU_BATCH_ROWS
    padded = 0
    for start in range(0, len(lengths), rows):
        part = lengths[start:start + rows]
        padded += sum(len(b) * int(part[b].max()) for b in pack(part, *GPU_BATCH))
    return 1.0 - float(lengths.sum()) / padded


def token_lengths(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Each text's tokens, truncated at the model's limit."""
    from transformers import AutoTokenizer

    from semvec.models import model_defaults

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    limit = model_defaults(model_dir).max_length
    return np.array([len(ids) for ids in tok(texts, truncation=True, max_length=limit)["input_ids"]])


def model_flops(model_dir: Path, texts: list[str]) -> tuple[int, float, float]:
    """(tokens, forward FLOPs, padding share of semvec's GPU batches) of the corpus, each text at
    its own truncated length."""
    from transformers import AutoConfig, AutoModel

    from semvec.models import load_options

    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), **load_options())
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    lengths = token_lengths(model_dir, texts)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    flops = 2.0 * dense * lengths.sum() + 4.0 * layers * hidden * float((lengths ** 2).sum())
    return int(lengths.sum()), flops, padding_share(lengths)


def sentence_transformers_fp16(model_dir: Path, texts: list[str], batch_sizes: list[int],
                               device: str) -> tuple[float, int, np.ndarray]:
    """(best seconds, its batch size, vectors) of fp16 `encode` (fp32 on CPU, where fp16 is slow)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from semvec.models import load_options

    # loaded as semvec loads it (no Hub kernels), so both run the same layers
    model = SentenceTransformer(str(model_dir), device=device, model_kwargs=load_options())
    if device == "cuda":
        model.half()
    model.encode(texts[:256], batch_size=64)  # warm-up: kernels, allocator
    best = None
    for size in batch_sizes:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        vectors = model.encode(texts, batch_size=size, convert_to_numpy=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        print(json.dumps({"run": "sentence-transformers", "batch_size": size, "seconds": round(seconds, 2)}),
              flush=True)
        if best is None or seconds < best[0]:
            best = (seconds, size, vectors.astype(np.float32))
    return best


def semvec_runs(given: list[str] | None, device: str) -> list[str]:
    """The `semvec embed` flags of each run. Encoder actors get a GPU only when asked
    (--num-gpus-per-worker; Ray hides the GPU from an actor that did not ask), so on a GPU every run
    asks for one unless its flags say how much: by default one actor per GPU with `auto`
    (bfloat16-mixed there) and with `--dtype bfloat16`, and two actors sharing the GPU."""
    if device != "cuda":
        return given or ["", "--dtype bfloat16"]
    runs = given or ["", "--dtype bfloat16", "--num-gpus-per-worker 0.5 --min-workers 2 --max-workers 2"]
    return [r if "--num-gpus-per-worker" in r else f"--num-gpus-per-worker 1 {r}".strip() for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--model", default="bundled", help="a model reference (a tiny model for a smoke run)")
    ap.add_argument("--st-batch-sizes", default="64,128,256")
    ap.add_argument("--semvec-args", action="append", default=None,
                    help='one semvec run per value, e.g. --semvec-args="--dtype bfloat16"')
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by its name)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--padding-only", action="store_true",
                    help="print the padding share of GPU forward passes for Ray batches of 2,048 to "
                         "16,384 rows (no GPU needed) and stop")
    args = ap.parse_args()
    import torch

    from semvec.models import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU)"
    peak = peak_tflops(gpu, args.peak_tflops) if device == "cuda" or args.peak_tflops else None
    out = Path(args.out or tempfile.mkdtemp(prefix="semvec-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    texts = mixed_corpus(args.rows)
    if args.padding_only:
        lengths = token_lengths(resolve_model(args.model), texts)
        shares = {rows: round(padding_share(lengths, rows), 4) for rows in (2048, 4096, 8192, 16384)}
        print(json.dumps(shares))
        return
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    model_dir = resolve_model(args.model)
    tokens, flops, padding = model_flops(model_dir, texts)
    header = {"gpu": gpu, "peak_tflops": peak, "rows": len(texts), "tokens": tokens,
              "semvec_gpu_batch_padding_share": round(padding, 4),
              "gflops_per_token": round(flops / tokens / 1e9, 4), "torch": torch.__version__}
    print(json.dumps(header), flush=True)

    def row(name: str, seconds: float, **more) -> dict:
        achieved = flops / seconds / 1e12
        r = {"run": name, "seconds": round(seconds, 2), "rows_per_s": round(len(texts) / seconds, 1),
             "tokens_per_s": round(tokens / seconds), "tflops": round(achieved, 3),
             "mfu": round(achieved / peak, 4) if peak else None, **more}
        print(json.dumps(r), flush=True)
        return r

    batches = [int(b) for b in args.st_batch_sizes.split(",") if b.strip()]
    st_seconds, st_batch, reference = sentence_transformers_fp16(model_dir, texts, batches, device)
    rows = [row(f"sentence-transformers {'fp16' if device == 'cuda' else 'fp32'} encode (batch {st_batch})",
                st_seconds)]
    for extra in semvec_runs(args.semvec_args, device):
        target = out / f"vectors-{len(rows)}"
        seconds, summary = time_semvec(corpus, target, ["--model", args.model, *shlex.split(extra)])
        rows.append(row(f"semvec embed {extra or '(defaults)'}", seconds, embedded=summary["embedded"],
                        vs_reference=round(st_seconds / seconds, 3),
                        least_cosine=round(least_cosine(target, reference), 6)))
    print(f"\n{gpu}, {len(texts):,} rows, {tokens:,} tokens, {header['gflops_per_token']} GFLOP/token, "
          f"peak {peak} TFLOP/s\n")
    print("| run | seconds | rows/s | tokens/s | TFLOP/s | MFU | vs reference | least cosine |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']} | {r['rows_per_s']:,} | {r['tokens_per_s']:,} | "
              f"{r['tflops']} | "
              f"{r['mfu'] if r['mfu'] is not None else '-'} | {r.get('vs_reference', 1.0)} | "
              f"{r.get('least_cosine', '-')} |")


if __name__ == "__main__":
    main()
