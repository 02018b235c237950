"""Precision candidates for the CPU fast path, in-process: seconds and least cosine to float32.

    .venv/bin/python benchmarks/int8.py [--rows 1000] [--out FILE]
    .venv/bin/python benchmarks/int8.py --kernels

--kernels times only the bare matrix product of the model's feed-forward layer (4,096 tokens x
384 -> 1,536), two threads, median of 30: float32, bfloat16 (AMX where the CPU has it), int8 x int8
-> int32 (`torch._int_mm`, the oneDNN kernel), and int8 with each token's activations quantised
and the product scaled back (what a per-token W8A8 layer would add): the ceiling of any int8 path
built on torch here, before accuracy.

Encodes the same rows of the mixed corpus (benchmarks/throughput.py) with the bundled model, two
threads, after a warm-up batch, median of three encodings, in:
- float32 and bfloat16-mixed (semvec's Encoder, as a backfill runs them);
- int8 weights and activations of every Linear layer with torch's dynamic quantisation, per-tensor
  and per-channel weight scales, on each quantised engine torch offers (onednn, x86, fbgemm);
- ONNX Runtime (when onnxruntime and onnx are installed: `pip install onnxruntime onnx`; not
  semvec dependencies): the model exported with `torch.onnx.export`, float32 and dynamically
  quantised to int8 (`onnxruntime.quantization.quantize_dynamic`: weights per channel, each
  product's input per tensor); the same after ONNX Runtime's transformer optimizer fused attention,
  norms and GELU; that fused graph with SmoothQuant-style smoothing calibrated on 600 other rows (`--alphas`);
  and int8 with one activation scale per token, built from standard ONNX ops, with attention's
  products in float32 or in int8 too;
- torchao (when installed: `pip install torchao`): int8 weights and per-token int8 activations on
  every Linear layer or all but attention's query/key/value, compiled (`torch.compile`), with the
  seconds of the first, compiling, call.
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
from semvec.encode import Encoder, pack, padded, pool  # noqa: E402
from semvec.models import resolve_model  # noqa: E402


def timed(encode, ids: list, warm: list, repeat: int = 3) -> tuple[np.ndarray, float]:
    """(vectors, median seconds of `repeat` encodings of `ids`) after one warm-up call."""
    encode(warm)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        vectors = encode(ids)
        times.append(time.perf_counter() - t)
    return vectors, float(np.median(times))


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


def ort_encoder(path: Path, enc: Encoder):
    """encode(ids) with the graph at `path` in ONNX Runtime, semvec's batches and pooling."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(rows: list) -> np.ndarray:
        lengths = np.array([len(r) for r in rows])
        out = np.zeros((len(rows), enc.dim), np.float32)
        for batch in pack(lengths, enc.batch_tokens, enc.max_rows):
            input_ids, attention = padded(rows, lengths, batch, enc.pad_id)
            hidden = session.run(None, {"input_ids": input_ids, "attention_mask": attention})[0]
            pooled = pool(torch.from_numpy(hidden), torch.from_numpy(attention), enc.pooling)
            out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out
    return encode


def export(model, path: Path) -> None:
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    axes = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "hidden": {0: "b", 1: "t"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(model).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes=axes)


def fuse(src: Path, dst: Path, config, attention: bool = True) -> None:
    """ONNX Runtime's transformer optimizer: attention, layer norms and GELU fused into its own ops
    (the attention pattern is found only in a graph exported with eager attention)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_model(str(src), model_type="bert", num_heads=config.num_attention_heads,
                       hidden_size=config.hidden_size, opt_level=1,
                       optimization_options=options).save_model_to_file(str(dst))


def dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": 1})  # fused ops hide their output types


def _weighted(graph, kinds=("MatMul", "Attention")) -> list:
    initializers = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type in kinds and n.input[1] in initializers]


def input_ranges(src: Path, enc: Encoder, rows: list) -> dict:
    """Per-channel largest |value| of every weighted node's input over `rows` (calibration)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(src))
    names = sorted({n.input[0] for n in _weighted(graph.graph)})
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths, ranges = np.array([len(r) for r in rows]), {}
    for batch in pack(lengths, enc.batch_tokens, enc.max_rows):
        input_ids, attention = padded(rows, lengths, batch, enc.pad_id)
        real = attention.reshape(-1).astype(bool)
        outputs = session.run(names, {"input_ids": input_ids, "attention_mask": attention})
        for name, x in zip(names, outputs, strict=True):
            top = np.abs(x.reshape(-1, x.shape[-1])[real]).max(0)
            ranges[name] = np.maximum(ranges[name], top) if name in ranges else top
    return ranges


def smoothed(src: Path, dst: Path, ranges: dict, alpha: float) -> None:
    """SmoothQuant's migration of activation range into the weights, for a post-norm encoder: the
    norm's output is also the residual stream, so the per-channel division cannot be folded into
    the norm and runs as a Mul before each product; the weight rows take the inverse scale."""
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx.load(str(src))
    weights = {t.name: t for t in graph.graph.initializer}
    for i, node in enumerate(_weighted(graph.graph)):
        w = numpy_helper.to_array(weights[node.input[1]])  # [in, out]
        reach = np.abs(w).max(1).clip(1e-5)
        s = (ranges[node.input[0]].clip(1e-5) ** alpha / reach ** (1 - alpha)).astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
        graph.graph.initializer.append(numpy_helper.from_array(1 / s, f"smooth{i}"))
        mul = helper.make_node("Mul", [node.input[0], f"smooth{i}"], [f"smoothed{i}"], name=f"Smooth{i}")
        node.input[0] = f"smoothed{i}"
        graph.graph.node.insert(list(graph.graph.node).index(node), mul)
    onnx.save(graph, str(dst))


def per_token_int8(src: Path, dst: Path) -> None:
    """Every MatMul with a weight in int8 (per output channel) and its input in int8 with one scale
    per token, built from standard ops (no ONNX Runtime kernel quantises per token): ReduceMax,
    Round, Cast to uint8 around zero point 128, MatMulInteger, and the product scaled back."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.load(str(src))
    g = graph.graph
    targets = {n.output[0] for n in _weighted(g, ("MatMul",))}  # outputs are unique names
    weights = {t.name: t for t in g.initializer}
    for name, value in (("pt_inv127", np.float32(1 / 127)), ("pt_eps", np.float32(1e-8)),
                        ("pt_128", np.float32(128)), ("pt_zero", np.uint8(128))):
        g.initializer.append(numpy_helper.from_array(np.array(value), name))
    nodes, quantised = [], {}
    for node in g.node:
        if node.output[0] not in targets:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantised:
            k = f"pt{len(quantised)}_"
            nodes += [helper.make_node("Abs", [x], [k + "abs"]),
                      helper.make_node("ReduceMax", [k + "abs"], [k + "max"], axes=[-1], keepdims=1),
                      helper.make_node("Max", [k + "max", "pt_eps"], [k + "top"]),
                      helper.make_node("Mul", [k + "top", "pt_inv127"], [k + "scale"]),
                      helper.make_node("Div", [x, k + "scale"], [k + "div"]),
                      helper.make_node("Round", [k + "div"], [k + "round"]),
                      helper.make_node("Add", [k + "round", "pt_128"], [k + "shift"]),
                      helper.make_node("Cast", [k + "shift"], [k + "q"], to=TensorProto.UINT8)]
            quantised[x] = (k + "q", k + "scale")
        q, scale = quantised[x]
        w = numpy_helper.to_array(weights[node.input[1]])
        w_scale = (np.abs(w).max(0).clip(1e-8) / 127).astype(np.float32)
        j = node.input[1] + "_pt"
        g.initializer.extend([numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), j + "q"),
                              numpy_helper.from_array(w_scale, j + "scale")])
        nodes += [helper.make_node("MatMulInteger", [q, j + "q", "pt_zero"], [j + "int"]),
                  helper.make_node("Cast", [j + "int"], [j + "float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [j + "float", scale], [j + "token"]),
                  helper.make_node("Mul", [j + "token", j + "scale"], [node.output[0]])]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    onnx.save(graph, str(dst))


def onnx_encoders(enc: Encoder, folder: Path, calibration: list, alphas: tuple = (0.7,)) -> dict:
    """{name: encode(ids)} for the exported graphs: float32 as exported and fused, int8 dynamic
    (per tensor) on each, smoothed, and per token. `calibration` rows (not the measured ones)
    set the smoothing scales."""
    exported, fused = folder / "model.onnx", folder / "fused.onnx"
    export(enc.model, exported)
    attention = enc.model.config._attn_implementation
    enc.model.config._attn_implementation = "eager"  # so the optimizer finds the attention pattern
    try:
        export(enc.model, folder / "eager.onnx")
    finally:
        enc.model.config._attn_implementation = attention
    fuse(folder / "eager.onnx", fused, enc.model.config)
    fuse(folder / "eager.onnx", folder / "unfused-attention.onnx", enc.model.config, attention=False)
    dynamic_int8(exported, folder / "int8.onnx")
    dynamic_int8(fused, folder / "fused-int8.onnx")
    ranges = input_ranges(fused, enc, calibration)
    for alpha in alphas:
        smoothed(fused, folder / f"smoothed-{alpha}.onnx", ranges, alpha)
        dynamic_int8(folder / f"smoothed-{alpha}.onnx", folder / f"smoothed-int8-{alpha}.onnx")
    per_token_int8(fused, folder / "per-token.onnx")
    per_token_int8(folder / "unfused-attention.onnx", folder / "per-token-all.onnx")
    graphs = {"onnx float32": exported, "onnx int8 (dynamic, per-channel)": folder / "int8.onnx",
              "onnx float32, fused": fused, "onnx int8 dynamic, fused": folder / "fused-int8.onnx",
              **{f"onnx int8 dynamic, fused, smoothed (alpha {a})": folder / f"smoothed-int8-{a}.onnx"
                 for a in alphas},
              "onnx int8 per token, attention float32": folder / "per-token.onnx",
              "onnx int8 per token, every weight product": folder / "per-token-all.onnx"}
    return {name: ort_encoder(path, enc) for name, path in graphs.items()}


def torchao_int8(model_dir: Path, attention_float: bool, warm: list) -> tuple[Encoder, float]:
    """(encoder, seconds of its first, compiling, call): torchao's int8 weights with int8
    activations scaled per token (`Int8DynamicActivationInt8WeightConfig`) on the Linear layers,
    all of them or all but attention's query/key/value, under `torch.compile(dynamic=True)` (in
    eager PyTorch the per-token quantisation runs as separate ops, slower than float32)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    enc = Encoder(model_dir, dtype="float32")

    def chosen(module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not (attention_float and ".attention.self." in name)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(enc.model, Int8DynamicActivationInt8WeightConfig(), filter_fn=chosen)
        enc.model = torch.compile(enc.model, dynamic=True)
        t = time.perf_counter()
        enc.encode_ids(warm)
    return enc, time.perf_counter() - t


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
    ap.add_argument("--alphas", default="0.7", help="smoothing strengths to try, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.kernels:
        print(json.dumps(kernels(), indent=2))
        return
    alphas = tuple(float(a) for a in args.alphas.split(","))
    model_dir = resolve_model("bundled")
    base = Encoder(model_dir, dtype="float32")
    texts = mixed_corpus(args.rows + 600)
    ids, calibration = base.tokenize(texts[:args.rows]).ids, base.tokenize(texts[args.rows:]).ids
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
            for name, encode in onnx_encoders(base, Path(folder), calibration, alphas).items():
                vectors, s = timed(encode, ids, warm)
                rows.append(compare(name, vectors, s, reference, base_s))
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("torchao not installed: its rows are skipped", file=sys.stderr)
    else:
        for attention_float in (False, True):
            enc, compile_s = torchao_int8(model_dir, attention_float, warm)
            vectors, s = timed(encode_with(enc), ids, warm)
            name = "torchao int8 per token, compiled" + (", attention float32" if attention_float else "")
            rows.append(compare(name, vectors, s, reference, base_s))
            rows[-1]["first_call_s"] = round(compile_s, 1)
            print(json.dumps({"run": name, "first_call_s": rows[-1]["first_call_s"]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
