"""sentence-transformers' ONNX int8 backend, timed the way benchmarks/throughput.py times its float32
reference: model loaded and warmed first, then one `encode` pass over the texts, nothing written.

    PYTHON benchmarks/st_onnx_int8.py --model DIR --texts FILE.json --batch-sizes 16,32 --out DIR \
        [--threads N]

Run by throughput.py (--st-onnx-int8 PYTHON) in an environment of its own: the backend needs
optimum-onnx, which today wants transformers 4 (semvec runs transformers 5), e.g.

    python3 -m venv /tmp/stv && /tmp/stv/bin/pip install torch==2.13.0 \
        "sentence-transformers<6" "optimum-onnx[onnxruntime]"

The model directory is copied into --out once and the quantised graph exported there
(`export_dynamic_quantized_onnx_model`, the avx512_vnni configuration, as sentence-transformers
documents for CPUs); later calls reuse it. Prints one JSON line: the seconds of each batch size's
pass; the vectors of the fastest go to --out/vectors-<batch>.npy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

QUANTISED = "onnx/model_qint8_avx512_vnni.onnx"


def quantised_model(model: Path, cache: Path, threads: int):
    import onnxruntime
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    copy = cache / "model"
    if not (copy / QUANTISED).is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(model, copy)
        onnx = SentenceTransformer(str(copy), device="cpu", backend="onnx")  # exports onnx/model.onnx
        onnx.save_pretrained(str(copy))
        export_dynamic_quantized_onnx_model(onnx, "avx512_vnni", str(copy))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # as many as the float32 reference's torch threads
    return SentenceTransformer(str(copy), device="cpu", backend="onnx",
                               model_kwargs={"file_name": QUANTISED, "session_options": options})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--texts", required=True, type=Path, help="a JSON list of strings")
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    model = quantised_model(args.model, args.out, args.threads)
    seconds = {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        model.encode(texts[:64], batch_size=16)  # warm-up
        t = time.perf_counter()
        vectors = model.encode(texts, batch_size=bs)
        seconds[bs] = round(time.perf_counter() - t, 2)
        np.save(args.out / f"vectors-{bs}.npy", vectors)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
