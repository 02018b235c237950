"""Precision candidates for the CPU fast path, in-process: seconds and least cosine to float32.

    .venv/bin/python benchmarks/int8.py [--rows 1000] [--out FILE]
    .venv/bin/python benchmarks/int8.py --kernels

--kernels times only the bare matrix product of the model's feed-forward layer (4,096 tokens x
384 -> 1,536), two threads, median of 30: float32, bfloat16 (AMX where the CPU has it), int8 x int8
-> int32 (`torch._int_mm`, the oneDNN kernel), and int8 with each token's activations quantised
and the product scaled back (what a per-token W8A8 layer would add): the ceiling of any int8 path
built on torch here, before accuracy.

Encodes the same rows of the mixed corpus (benchmarks/throughput.py) with the bundled model, two
threads, after a warm-up batch, in:
- float32 and bfloat16-mixed (semvec's Encoder, as a backfill runs them);
- int8 weights and activations of every Linear layer with torch's dynamic quantisation, per-tensor
  and per-channel weight scales, on each quantised engine torch offers (onednn, x86, fbgemm);
- ONNX Runtime: the model exported with `torch.onnx.export`, float32 and dynamically quantised to
  int8 (`onnxruntime.quantization.quantize_dynamic`, per-channel), when onnxruntime and onnx are
  installed (`pip install onnxruntime onnx`; not semvec dependencies).
Every candidate runs semvec's length-sorted token-budget batches and pooling; each row's vector is
compared with its float32 vector (least cosine, and the 1st percentile). The int8 bar of issue 14
is least cosine >= 0.99; the default's is 0.9999.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.throughput import mixed_corpus  # noqa: E402
from semvec.encode import Encoder, pack, pool  # noqa: E402
from semvec.models import resolve_model  # noqa: E402


def timed(encode, ids: list, warm: list) -> tuple[np.ndarray, float]:
    encode(warm)
    t = time.perf_counter()
    vectors = encode(ids)
    return vectors, time.perf_counter() - t


def compare(name: str, vectors: np.ndarray, seconds: float, reference: np.ndarray, base_s: float) -> dict:
    cos = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    row = {"run": name, "seconds": round(seconds, 2), "speed_vs_float32": round(base_s / seconds, 2),
           "least_cosine": round(float(cos.min()), 6), "p1_cosine": round(float(np.percentile(cos, 1)), 6)}
    print(json.dumps(row), flush=True)
    return row


def torch_dynamic(model_dir: Path, engine: str, per_channel: bool) -> Encoder:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = engine
    enc = Encoder(model_dir, dtype="float32")
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {n: qconfig for n, m in enc.model.named_modules() if isinstance(m, torch.nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's notice that it moves to torchao
        enc.model = quantize_dynamic(enc.model, spec, dtype=torch.qint8)
    return enc


class _Hidden(torch.nn.Module):
    """The model's last hidden state from ids and mask: the graph ONNX Runtime runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_encoders(enc: Encoder, folder: Path) -> dict:
    """{name: encode(ids)} for the exported float32 graph and its int8 quantisation."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    axes = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "hidden": {0: "b", 1: "t"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(enc.model).eval(), (ids, mask), str(fp32), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes=axes)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)

    def encoder_for(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def encode(rows: list) -> np.ndarray:
            lengths = np.array([len(r) for r in rows])
            out = np.zeros((len(rows), enc.dim), np.float32)
            for batch in pack(lengths, enc.batch_tokens, enc.max_rows):
                width = int(lengths[batch].max())
                input_ids = np.full((len(batch), width), enc.pad_id, np.int64)
                attention = np.zeros((len(batch), width), np.int64)
                for j, i in enumerate(batch):
                    input_ids[j, :lengths[i]], attention[j, :lengths[i]] = rows[i], 1
                hidden = session.run(None, {"input_ids": input_ids, "attention_mask": attention})[0]
                pooled = pool(torch.from_numpy(hidden), torch.from_numpy(attention), enc.pooling)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            return out
        return encode

    return {"onnx float32": encoder_for(fp32), "onnx int8 (dynamic, per-channel)": encoder_for(int8)}


def kernels(m: int = 4096, k: int = 384, n: int = 1536, repeat: int = 30) -> list[dict]:
    """Milliseconds per product (median of `repeat`) for each kernel, and its speed vs float32."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a16, w16 = a.bfloat16(), w.bfloat16()
    w_scale = w.abs().amax(1) / 127  # per output channel
    w8 = torch.round(w / w_scale[:, None]).to(torch.int8).T.contiguous()  # [k, n]
    a8 = torch.round(a / (a.abs().amax() / 127)).to(torch.int8)

    def per_token():
        scale = a.abs().amax(1, keepdim=True) / 127
        q = torch.round(a / scale).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(q, w8).float() * scale * w_scale

    runs = {"float32": lambda: a @ w.T, "bfloat16": lambda: a16 @ w16.T,
            "int8 x int8 -> int32 (torch._int_mm)": lambda: torch._int_mm(a8, w8),
            "int8 with per-token quantisation and rescale": per_token}
    out = []
    for name, f in runs.items():
        f()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        out.append({"kernel": name, "ms": round(1e3 * float(np.median(times)), 3)})
    for r in out:
        r["vs_float32"] = round(out[0]["ms"] / r["ms"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kernels", action="store_true", help="time the bare matrix products only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.kernels:
        print(json.dumps(kernels(), indent=2))
        return
    model_dir = resolve_model("bundled")
    base = Encoder(model_dir, dtype="float32")
    ids = base.tokenize(mixed_corpus(args.rows)).ids
    warm = ids[:64]

    def encode_with(e: Encoder):
        return lambda rows: e.encode_ids(rows)[0]

    reference, base_s = timed(encode_with(base), ids, warm)
    rows = [compare("float32", reference, base_s, reference, base_s)]
    vectors, s = timed(encode_with(Encoder(model_dir, dtype="bfloat16-mixed")), ids, warm)
    rows.append(compare("bfloat16-mixed", vectors, s, reference, base_s))
    for engine in [e for e in ("onednn", "x86", "fbgemm") if e in torch.backends.quantized.supported_engines]:
        for per_channel in (False, True):
            vectors, s = timed(encode_with(torch_dynamic(model_dir, engine, per_channel)), ids, warm)
            scales = "per-channel" if per_channel else "per-tensor"
            rows.append(compare(f"torch int8 dynamic ({engine}, {scales})", vectors, s, reference, base_s))
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime or onnx not installed: the ONNX rows are skipped", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as folder:
            for name, encode in onnx_encoders(base, Path(folder)).items():
                vectors, s = timed(encode, ids, warm)
                rows.append(compare(name, vectors, s, reference, base_s))
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
