"""A real process: a backfill against an S3 server on loopback (crashes: tests/test_exactly_once.py)."""

import json
import os
import subprocess
import sys

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
