"""`semvec embed` against an S3 server on loopback: input, model and output there (crashes:
tests/test_exactly_once.py). It runs in this process on the tests' Ray, whose workers hold the
server's credentials in their runtime_env as a cluster job's workers do."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from semvec.encode import Encoder
from semvec.testing import corpus_sentences
from tests.conftest import VECTOR_ATOL, cli

pytestmark = pytest.mark.slow


def test_backfill_with_input_model_and_output_on_s3(ray_local, s3_env, tiny_models, monkeypatch,
                                                    capsys):
    env = s3_env["env"]
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
    monkeypatch.setenv("SEMVEC_CACHE", str(s3_env["root"].parent / "cache"))
    code, out, err = cli(capsys, *args)
    assert code == 0, err[-2000:]
    assert "300 embedded" in out

    manifest = json.loads(fs.cat("bucket/vectors/run1/_manifest.json"))
    assert manifest["totals"]["embedded"] == 300
    parts = [p for p in fs.ls("bucket/vectors/run1") if p.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(fs.open(p)) for p in parts])
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    want = Encoder(tiny_models["bert"]).encode_texts(texts)
    ids = [f"p{i // 100}-{i % 100}" for i in range(300)]
    np.testing.assert_allclose(np.array([got[i] for i in ids]), want, atol=VECTOR_ATOL)

    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out + err
    assert secret not in json.dumps(manifest)

    code, out, err = cli(capsys, *args)
    assert code == 0 and "nothing left to embed: every row was in the output already" in out
