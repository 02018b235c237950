"""The GPU benchmark script runs as one command: here on CPU, with a tiny model on a few rows (a
lent GPU runs the same command at full size; its numbers go to benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_gpu_benchmark_runs_end_to_end_on_cpu(tiny_models, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--rows", "40", "--model",
         str(tiny_models["bert"]), "--st-batch-sizes", "8", "--semvec-args=", "--peak-tflops", "1.0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    header, runs = lines[0], [r for r in lines[1:] if "rows_per_s" in r]
    assert header["rows"] == 40 and header["tokens"] > 40 and header["gflops_per_token"] > 0
    reference, semvec = runs
    assert reference["run"].startswith("sentence-transformers fp32 encode")  # fp16 only on a GPU
    assert semvec["embedded"] == 40 and semvec["least_cosine"] > 0.9999  # the same model, fp32 both
    for r in runs:  # MFU is the achieved FLOP rate over the given peak
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, abs=1e-3) and r["tokens_per_s"] > 0
    assert "| semvec embed (defaults) |" in done.stdout

