"""Weights per node: how much memory K encoder actors on one node spend on the model's weights.

    .venv/bin/python benchmarks/shared_weights.py [--actors 2] [--model bundled]
                                                  [--dtypes auto float16] [--out FILE]

Starts a local Ray, then for each precision K backfill encoder actors (semvec's EncodeActor, one
CPU each) on the model; each encodes one batch, then the driver reads every actor's
/proc/PID/smaps. Reported per precision: the model file's size, the memory the actors' mappings of
it hold together (proportional set size, PSS: a page shared by K processes counts 1/K in each,
so the sum is the physical memory), and the actors' whole PSS and private memory. With weights
left in the memory-mapped file (float32 weights, as `auto` runs them on a CPU, also under
bfloat16 autocast) the file's pages are held once per node; a cast (pinned float16) gives each
actor its own copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import ray

from semvec import models
from semvec.backfill.stages import EncodeActor
from semvec.cluster import init_ray
from semvec.models import model_defaults
from semvec.testing import corpus_sentences
from semvec.tokens import load_tokenizer, tokenize


def memory(pid: int, file_name: str) -> dict:
    """kB: the resident size (RSS) and PSS of the process's mappings of `file_name`, and its whole
    PSS and private memory (USS), as psutil reads them from /proc/PID/smaps."""
    proc = psutil.Process(pid)
    mapped = [m for m in proc.memory_maps(grouped=True) if m.path.endswith(file_name)]
    whole = proc.memory_full_info()
    return {"file_rss_kb": sum(m.rss for m in mapped) // 1024,
            "file_pss_kb": sum(m.pss for m in mapped) // 1024,
            "pss_kb": whole.pss // 1024, "private_kb": whole.uss // 1024}


def measure(model_dir: Path, dtype: str, actors: int, batch: pa.Table) -> dict:
    defaults = model_defaults(model_dir)
    config = {"granularity": "sentence", "pooling": defaults.pooling, "normalize": defaults.normalize,
              "max_length": defaults.max_length, "dtype": dtype, "batch_tokens": None,
              "trust_remote_code": False, "device": "cpu"}
    cls = ray.remote(num_cpus=1)(EncodeActor)
    pool = [cls.remote(str(model_dir), config, 1) for _ in range(actors)]
    ray.get([a.__call__.remote(batch) for a in pool])  # every actor loaded and has encoded
    pids = ray.get([a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in pool])
    per = [memory(pid, "model.safetensors") for pid in pids]
    for a in pool:
        ray.kill(a)
    size = (model_dir / "model.safetensors").stat().st_size
    return {"dtype": dtype, "actors": actors, "file_mb": round(size / 1e6, 1),
            "file_rss_mb_per_actor": [round(p["file_rss_kb"] / 1e3, 1) for p in per],
            "file_pss_mb_all_actors": round(sum(p["file_pss_kb"] for p in per) / 1e3, 1),
            "pss_mb_all_actors": round(sum(p["pss_kb"] for p in per) / 1e3, 1),
            "private_mb_per_actor": [round(p["private_kb"] / 1e3, 1) for p in per]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtypes", nargs="+", default=["auto", "float16"])
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    model_dir = models.resolve_model(args.model)
    if not (model_dir / "model.safetensors").is_file():
        sys.exit(f"{model_dir} has no model.safetensors (a sharded model: sum its files by hand)")
    tok = load_tokenizer(model_dir)
    ids = tokenize(tok, corpus_sentences(64, seed=0), 128).ids
    batch = pa.table({"input_ids": pa.array([np.asarray(x, np.int64) for x in ids], pa.list_(pa.int64())),
                      "reason": pa.nulls(len(ids), pa.string())})
    init_ray({})
    rows = [measure(model_dir, d, args.actors, batch) for d in args.dtypes]
    print("| precision | actors | model file MB | file pages each actor sees (RSS MB) | "
          "file pages held, all actors (PSS MB) | all actors PSS MB | private MB per actor |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['actors']} | {r['file_mb']} | "
              f"{', '.join(map(str, r['file_rss_mb_per_actor']))} | {r['file_pss_mb_all_actors']} | "
              f"{r['pss_mb_all_actors']} | {', '.join(map(str, r['private_mb_per_actor']))} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
