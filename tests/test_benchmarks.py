"""The GPU benchmark script runs as one command: here on CPU, with a tiny model on a few rows (a
lent GPU runs the same command at full size; its numbers go to benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _check_gpu_benchmark_output(stdout: str) -> None:
    """gpu.py's lines on CPU, 40 rows of a tiny model: the FLOP count, both runs, MFU against the
    given peak, the table."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    header, runs = lines[0], [r for r in lines[1:] if "rows_per_s" in r]
    assert header["rows"] == 40 and header["tokens"] > 40 and header["gflops_per_token"] > 0
    reference, semvec = runs
    assert reference["run"].startswith("sentence-transformers fp32 encode")  # fp16 only on a GPU
    assert semvec["embedded"] == 40 and semvec["least_cosine"] > 0.9999  # the same model, fp32 both
    for r in runs:  # MFU is the achieved FLOP rate over the given peak
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, abs=1e-3) and r["tokens_per_s"] > 0
    assert "| semvec embed (defaults) |" in stdout


def test_gpu_runs_ask_for_the_gpu():
    """Ray hides the GPU from an actor that does not ask for one: on a GPU every semvec run of the
    benchmark asks, unless its flags say how much."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu import semvec_runs

    assert all("--num-gpus-per-worker" in r for r in semvec_runs(None, "cuda"))
    assert semvec_runs(["--dtype float32", "--num-gpus-per-worker 0.25"], "cuda") == [
        "--num-gpus-per-worker 1 --dtype float32", "--num-gpus-per-worker 0.25"]
    assert semvec_runs(None, "cpu") == ["", "--dtype bfloat16"]


def test_device_kit_parts_gather_over_calls_then_the_benchmark_runs(tiny_models, tmp_path):
    """The lent GPU machine gets the kit one part per call (64 MiB each): each call keeps its part,
    the last one checks the joined archive and runs gpu.py on the kit's model and datasets. Here
    without wheels (Ray is installed) and with a tiny model, in parts of 4 MB: the benchmark runs
    end to end on CPU, on 40 rows."""
    from benchmarks.device_kit import build

    kit = build(tmp_path / "kit", 4_000_000, "3.11", model=tiny_models["bert"], wheels=False)
    assert kit["parts"] >= 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEMVEC_KIT_PYTHON": sys.executable,
           "SEMVEC_KIT_DIR": str(tmp_path / "carried"), "OUT": str(tmp_path / "out")}

    def call(part: int, store: str) -> subprocess.CompletedProcess:
        shutil.rmtree(tmp_path / "carried", ignore_errors=True)
        shutil.copytree(tmp_path / "kit" / str(part), tmp_path / "carried" / str(part))
        return subprocess.run(["bash", "benchmarks/device_gpu.sh", "--rows", "40", "--st-batch-sizes", "8",
                               "--semvec-args=", "--peak-tflops", "1.0"], capture_output=True, text=True,
                              cwd=REPO, timeout=600, env={**env, "SEMVEC_KIT_STORE": str(tmp_path / store)})

    for part in range(1, kit["parts"]):
        done = call(part, "store")
        assert done.returncode == 0 and f"{part} of {kit['parts']} parts here" in done.stdout, done.stderr
        assert "carry the next part" in done.stdout
    done = call(kit["parts"], "store")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_gpu_benchmark_output(done.stdout)  # the one command a lent GPU runs, here on CPU
    assert "| semvec embed (defaults) |" in (tmp_path / "out" / "gpu.log").read_text()
    # a part damaged on the way: refused before anything runs, and nothing half-made is kept
    last = next((tmp_path / "kit" / str(kit["parts"])).glob("kit.tar.*"))
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    for part in range(1, kit["parts"] + 1):
        done = call(part, "store2")
    assert done.returncode == 1 and "do not match the kit's sha256" in done.stderr
    assert not (tmp_path / "store2" / kit["sha256"]).exists()
    # no part carried: said so, in one line
    shutil.rmtree(tmp_path / "carried")
    done = subprocess.run(["bash", "benchmarks/device_gpu.sh"], capture_output=True, text=True, cwd=REPO,
                          env={**env, "SEMVEC_KIT_STORE": str(tmp_path / "store3")}, timeout=60)
    assert done.returncode == 2 and "no kit part in" in done.stderr
