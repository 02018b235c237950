"""Real processes: a backfill against an S3 server on loopback, and a driver killed mid-run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from semvec.encode import Encoder
from semvec.testing import corpus_sentences
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def cli(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semvec.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **env}, timeout=timeout)


def test_backfill_with_input_model_and_output_on_s3(s3_server, tiny_models):
    env = s3_server["env"]
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    texts = corpus_sentences(300, seed=21)
    for part in range(3):
        rows = "".join(json.dumps({"id": f"p{part}-{i}", "text": t}) + "\n"
                       for i, t in enumerate(texts[part * 100:(part + 1) * 100]))
        fs.pipe(f"bucket/corpus/part{part}.jsonl", rows.encode())
    fs.put(str(tiny_models["bert"]), "bucket/models/tiny", recursive=True)

    args = ["embed", "s3://bucket/corpus/", "s3://bucket/vectors/run1", "--model",
            "s3://bucket/models/tiny", "--id-field", "id", "--rows-per-file", "60"]
    cache = {"SEMVEC_CACHE": str(s3_server["root"].parent / "cache")}
    result = cli(*args, env={**env, **cache})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "300 embedded" in result.stdout

    manifest = json.loads(fs.cat("bucket/vectors/run1/_manifest.json"))
    assert manifest["totals"]["embedded"] == 300
    parts = [p for p in fs.ls("bucket/vectors/run1") if p.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(fs.open(p)) for p in parts])
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    want = Encoder(tiny_models["bert"]).encode_texts(texts)
    ids = [f"p{i // 100}-{i % 100}" for i in range(300)]
    np.testing.assert_allclose(np.array([got[i] for i in ids]), want, atol=1e-5)

    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in result.stdout + result.stderr
    assert secret not in json.dumps(manifest)

    again = cli(*args, env={**env, **cache})
    assert again.returncode == 0 and "0 rows this run" in again.stdout


def _output_table(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(str(out / "part-*")))])


def test_driver_killed_mid_run_then_rerun_gives_the_uninterrupted_result(tiny_models, tmp_path):
    n = 40_000
    texts = corpus_sentences(n, seed=9)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    args = ["--model", str(tiny_models["bert"]), "--id-field", "id", "--rows-per-file", "2000",
            "--batch-rows", "250"]
    env = {"PYTHONUNBUFFERED": "1"}

    ref = cli("embed", str(src), str(tmp_path / "ref"), *args, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "crash"
    proc = subprocess.Popen([sys.executable, "-m", "semvec.cli", "embed", str(src), str(out), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(glob.glob(str(out / "part-*"))) < 3:
        assert proc.poll() is None, "the run finished before it could be killed; use more rows"
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The driver is gone; its local Ray goes with it. Make sure nothing of it still writes.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(2)
    partial = len(_output_table(out))
    assert 0 < partial < n

    rerun = cli("embed", str(src), str(out), *args, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got, want = _output_table(out).sort_by("id"), _output_table(tmp_path / "ref").sort_by("id")
    assert got["id"].to_pylist() == want["id"].to_pylist()  # every row exactly once
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(want["embedding"].to_numpy(zero_copy_only=False)), atol=1e-5)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["embedded"] == n
