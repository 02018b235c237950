"""How a backfill fails, on real pieces: a model that fails on rows (the failure threshold), a
tokenizer that refuses a row, the store failing under a read, rows missing at the end of an input,
the S3 lease (stale takeover, renewal, a lease taken from a running job), and GPUs that a local
Ray cannot have. Each failure is one line and a non-zero exit; every row stays accounted for."""

import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from semvec import cli
from semvec.backfill.job import run
from semvec.backfill.manifest import AccountingError, OutputDir
from semvec.backfill.read import RowParser, has_rows
from semvec.config import InputFormat, load_embed_config
from semvec.encode import Encoder
from semvec.errors import JobFailed
from semvec.lease import Lease, LeaseHeld
from semvec.storage import list_inputs
from tests.conftest import REPO, VECTOR_ATOL, S3Server, write_jsonl

# The tiny BERT's WordPiece vocabulary: 5 special tokens, then every character alone and as
# "##x" (ids below this), then whole words (see semvec.testing).
CHARACTER_PIECES = 5 + 2 * 68


def short_vocab_model(tiny_bert: Path) -> Path:
    """The tiny BERT with an embedding table of the character pieces only. It loads and its
    tokenizer works, but a text holding a whole word ("the") gives a token id past the table and
    the forward pass raises IndexError, as a model whose weights don't match its tokenizer does.
    Digits tokenize to character pieces, so "12 345" embeds."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(tiny_bert)
    config.vocab_size = CHARACTER_PIECES
    BertModel(config).save_pretrained(tiny_bert)
    return tiny_bert


def picky_tokenizer_model(tiny_bert: Path) -> Path:
    """The tiny BERT with a custom tokenizer (trust_remote_code) that raises on one word."""
    (tiny_bert / "tokenization_picky.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class PickyTokenizer(PreTrainedTokenizerFast):\n"
        "    def __call__(self, text=None, *args, **kwargs):\n"
        "        texts = [text] if isinstance(text, str) else list(text or [])\n"
        "        if any('forbidden' in t for t in texts):\n"
        "            raise ValueError('this tokenizer refuses the word forbidden')\n"
        "        return super().__call__(text, *args, **kwargs)\n"
    )
    config_path = tiny_bert / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PickyTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_picky.PickyTokenizer"]}
    config_path.write_text(json.dumps(config))
    return tiny_bert


def output_rows(out: Path) -> list[dict]:
    return [r for p in sorted(glob.glob(str(out / "part-*.parquet"))) for r in pq.read_table(p).to_pylist()]


def quarantine_rows(out: Path) -> list[dict]:
    return [r for p in sorted(glob.glob(str(out / "_quarantine" / "part-*.parquet")))
            for r in pq.read_table(p).to_pylist()]


def manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def each_row_once(out: Path, n: int) -> None:
    rows = sorted(r["row"] for r in output_rows(out) + quarantine_rows(out))
    assert rows == list(range(n))


def error_line(err: str) -> str:
    """The one line semvec ended with; Ray's own log lines may come before it, no traceback."""
    ours = [line for line in err.splitlines() if line.startswith("semvec:")]
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return ours[0]


def start_cli(*args, env: dict) -> subprocess.Popen:
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "semvec.cli", "embed", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended first: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# ---------------------------------------------------------------- failure threshold


@pytest.mark.parametrize("failing, good, share, code", [
    (24, 0, None, 1),  # a model that fails on every row
    (1, 39, None, 0),  # 2.5% failed: under the default 5%
    (1, 39, 0.01, 1),  # the same over a threshold of 1%
])
def test_the_failure_threshold_fails_a_job_whose_model_fails_on_too_many_rows(
        ray_local, tiny_bert, tmp_path, capsys, failing, good, share, code):
    model = short_vocab_model(tiny_bert)
    texts = [f"the cat {i}" for i in range(failing)] + [f"{i} {i * 37} {i * 101}" for i in range(good)]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    args = ["embed", str(src), str(out), "--model", str(model), "--id-field", "id", "--batch-rows", "8"]
    got = cli.main(args + ([] if share is None else ["--max-failed-share", str(share)]))
    assert got == code
    m = manifest(out)
    assert m["totals"] == {"rows": failing + good, "embedded": good, "quarantined": failing}
    assert m["inputs"][0]["quarantine_reasons"] == {"encode_failed": failing}
    assert all(r["reason"].startswith("encode_failed: IndexError") for r in quarantine_rows(out))
    each_row_once(out, failing + good)
    err = capsys.readouterr().err
    if code == 0:
        assert m["status"] == "complete" and "semvec: error" not in err
        return
    line = error_line(err)
    assert line.startswith(f"semvec: error: JobFailed: {failing} of {failing + good} rows given to "
                           "the model failed (encode_failed or tokenize_failed")
    assert m["status"] == "failed" and m["error"] in line


# ---------------------------------------------------------------- tokenizer


def test_a_row_the_tokenizer_refuses_is_quarantined_and_the_job_goes_on(ray_local, tiny_models,
                                                                         tiny_bert, tmp_path):
    model = picky_tokenizer_model(tiny_bert)
    texts = [f"the cat {i}" if i % 7 else f"a forbidden dog {i}" for i in range(20)]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    settings = {"input": str(src), "model": str(model), "id_field": "id", "batch_rows": 8,
                "trust_remote_code": True}
    # 3 of 20 refused is above the default failure threshold, which counts tokenize_failed too
    with pytest.raises(JobFailed, match="3 of 20 rows given to the model failed"):
        run(load_embed_config(None, output=str(tmp_path / "strict"), **settings))
    summary = run(load_embed_config(None, output=str(tmp_path / "out"), max_failed_share=0.5, **settings))
    assert (summary["embedded"], summary["quarantined"]) == (17, 3)
    bad = quarantine_rows(tmp_path / "out")
    assert sorted(r["row"] for r in bad) == [0, 7, 14]
    assert all(r["reason"].startswith("tokenize_failed: ValueError: this tokenizer refuses") for r in bad)
    assert [r["raw"] for r in sorted(bad, key=lambda r: r["row"])] == [texts[0], texts[7], texts[14]]
    assert manifest(tmp_path / "out")["inputs"][0]["quarantine_reasons"] == {"tokenize_failed": 3}
    good = sorted(output_rows(tmp_path / "out"), key=lambda r: r["row"])
    want = Encoder(tiny_models["bert"]).encode_texts([texts[r["row"]] for r in good])
    np.testing.assert_allclose(np.array([r["embedding"] for r in good]), want, atol=VECTOR_ATOL)


# ---------------------------------------------------------------- the store fails under a read


@pytest.mark.slow
def test_a_store_that_fails_under_a_read_fails_the_job_and_the_rerun_reads_the_file(tiny_models,
                                                                                    tmp_path):
    texts = [f"{w} {i}" for i, w in enumerate(["the cat sat", "a dog ran", "blue river"] * 20)]
    server = S3Server(tmp_path / "s3").start()
    try:
        (server.root / "bucket" / "in").mkdir()
        write_jsonl(server.root / "bucket" / "in" / "in.jsonl",
                    [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
        out = tmp_path / "out"
        args = ["s3://bucket/in/", str(out), "--model", str(tiny_models["bert"]), "--id-field", "id",
                "--batch-rows", "16"]
        env = {**server.env, "AWS_MAX_ATTEMPTS": "2"}
        first = start_cli(*args, env=env)
        wait_for(out / "_lease.json", first)  # listed and planned; Ray and the read are to come
        server.kill()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 1, err[-2000:]
        line = error_line(err)
        assert line.startswith("semvec: error: JobFailed: reading 'in.jsonl' failed in the store ("), line
        assert "rerun" in line and server.secret not in err
        assert manifest(out)["status"] == "failed"
        assert not quarantine_rows(out)  # above all, no unreadable_file for a file that is fine
        server.start()
        again = start_cli(*args, env=env)
        _, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-2000:]
    finally:
        server.stop()
    m = manifest(out)
    assert m["status"] == "complete" and m["totals"]["embedded"] == len(texts)
    rows = sorted(output_rows(out), key=lambda r: r["row"])
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]),
                               Encoder(tiny_models["bert"]).encode_texts(texts), atol=VECTOR_ATOL)


# ---------------------------------------------------------------- rows missing at the end


def last_part(out: Path) -> Path:
    return Path(max(glob.glob(str(out / "part-*.parquet")), key=lambda p: p.split("-")[-1]))


def test_rows_gone_from_the_end_of_a_finished_output_are_embedded_again(ray_local, tiny_models,
                                                                          tmp_path):
    texts = [f"the cat {i}" for i in range(40)]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    config = load_embed_config(None, input=str(src), output=str(out), model=str(tiny_models["bert"]),
                               id_field="id", batch_rows=8, rows_per_file=16)
    run(config)
    want = sorted(output_rows(out), key=lambda r: r["row"])
    gone = pq.read_table(last_part(out)).num_rows
    last_part(out).unlink()  # the rows left are 0 .. k, with no gap: only their count tells
    summary = run(config)
    assert summary["rows_this_run"] == gone and summary["embedded"] == 40
    got = sorted(output_rows(out), key=lambda r: r["row"])
    assert [r["id"] for r in got] == [r["id"] for r in want]
    np.testing.assert_allclose(np.array([r["embedding"] for r in got]),
                               np.array([r["embedding"] for r in want]), atol=VECTOR_ATOL)
    assert manifest(out)["status"] == "complete"


def test_the_end_check_finds_an_input_short_of_the_rows_read_from_it(ray_local, tiny_models, tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": f"the cat {i}"} for i in range(30)])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": f"a dog {i}"} for i in range(5)])
    out = tmp_path / "out"
    run(load_embed_config(None, input=str(tmp_path / "in"), output=str(out),
                          model=str(tiny_models["bert"]), batch_rows=8, rows_per_file=10))
    files = list_inputs(str(tmp_path / "in"))
    parser = RowParser("text", None, 200_000)

    def rows_in(f):
        return has_rows(f, InputFormat.JSONL, parser)

    parts = OutputDir(str(out))
    parts.account(files, rows_in)  # as the job left it: whole
    last_part(out).unlink()  # the part holding a.jsonl's last row (29): no gap below it
    with pytest.raises(AccountingError, match="'a.jsonl': no committed part holds its last row"):
        parts.account(files, rows_in)
    for p in [p for ps in parts.parts_by_source().values() for p in ps]:  # a.jsonl's and b.jsonl's
        os.remove(p)
    with pytest.raises(AccountingError, match="'a.jsonl' has rows but none of them is in a committed"):
        parts.account(files, rows_in)
    (tmp_path / "in" / "a.jsonl").write_text("")  # an input without rows needs no part
    (tmp_path / "in" / "b.jsonl").write_text("")
    parts.account(list_inputs(str(tmp_path / "in")), rows_in)


# ---------------------------------------------------------------- the S3 lease


def s3(env: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]},
                             skip_instance_cache=True)


def lease_record(**fields) -> bytes:
    return json.dumps({"token": uuid.uuid4().hex, "what": "backfill", "host": "elsewhere",
                       "pid": 1, "renewed_at": time.time(), "ttl_s": 120.0, **fields}).encode()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder", ["not renewed for longer than its ttl", "a dead process on this host"])
def test_a_stale_s3_lease_is_taken_over_only_if_it_is_still_the_one_read(s3_env, holder):
    fs = s3(s3_env["env"])
    prefix = f"s3://bucket/{uuid.uuid4().hex}"
    key = f"{prefix[5:]}/_lease.json"
    if holder.startswith("not renewed"):
        stale = lease_record(renewed_at=time.time() - 600)
    else:
        stale = lease_record(host=socket.gethostname(), pid=dead_pid())
    fs.pipe(key, stale)
    etag = fs.info(key, refresh=True)["ETag"]
    lease = Lease(prefix, "_lease.json", what="backfill", ttl_s=60)
    # What the lease sends (rclone's server ignores conditions, AWS S3 would refuse a stale ETag):
    # recorded from the lease's own client, nothing replaced.
    sent = []
    lease.fs.connect()
    lease.fs.s3.meta.events.register("provide-client-params.s3.PutObject",
                                      lambda params, **_: sent.append(dict(params)))
    with lease:
        assert lease.took_stale == json.loads(stale)
        assert sent[0].get("IfMatch") == etag and "IfNoneMatch" not in sent[0]
        assert json.loads(fs.cat(key))["token"] == lease.token
    assert not fs.exists(key)


def test_a_live_s3_lease_is_refused_and_a_new_one_created_only_if_none(s3_env):
    fs = s3(s3_env["env"])
    prefix = f"s3://bucket/{uuid.uuid4().hex}"
    fs.pipe(f"{prefix[5:]}/_lease.json", lease_record(host="worker-7", pid=4242))
    with pytest.raises(LeaseHeld, match="held by another backfill \\(host worker-7, pid 4242") as refused:
        Lease(prefix, "_lease.json", what="backfill").acquire()
    assert refused.value.exit_code == 3
    fresh = Lease(f"s3://bucket/{uuid.uuid4().hex}", "_lease.json", what="backfill")
    sent = []
    fresh.fs.connect()
    fresh.fs.s3.meta.events.register("provide-client-params.s3.PutObject",
                                     lambda params, **_: sent.append(dict(params)))
    with fresh:
        assert sent[0].get("IfNoneMatch") == "*" and fresh.took_stale is None


def test_an_s3_lease_is_renewed_while_held_so_it_never_goes_stale(s3_env):
    fs = s3(s3_env["env"])
    prefix = f"s3://bucket/{uuid.uuid4().hex}"
    key = f"{prefix[5:]}/_lease.json"
    with Lease(prefix, "_lease.json", what="backfill", ttl_s=2.0) as lease:
        first = json.loads(fs.cat(key))
        time.sleep(3.5)  # past its ttl: without renewal another run would take it now
        now = json.loads(fs.cat(key))
        assert now["token"] == lease.token and now["renewed_at"] > first["renewed_at"] + 1
        with pytest.raises(LeaseHeld):
            Lease(prefix, "_lease.json", what="backfill", ttl_s=2.0).acquire()
        assert lease.holds() and not lease.lost.is_set()
    assert not fs.exists(key)


def test_an_s3_lease_taken_by_another_run_is_lost_and_left_to_it(s3_env):
    fs = s3(s3_env["env"])
    prefix = f"s3://bucket/{uuid.uuid4().hex}"
    key = f"{prefix[5:]}/_lease.json"
    other = lease_record()
    with Lease(prefix, "_lease.json", what="backfill", ttl_s=2.0) as lease:
        # right after a renewal, so that the next one (0.5 s later) reads what the other run wrote
        renewed = json.loads(fs.cat(key))["renewed_at"]
        while json.loads(fs.cat(key))["renewed_at"] == renewed:
            time.sleep(0.02)
        fs.pipe(key, other)
        deadline = time.time() + 5
        while not lease.lost.is_set():
            assert time.time() < deadline, "the renewal did not notice"
            time.sleep(0.05)
        assert not lease.holds()
    assert fs.cat(key) == other  # the other run's lease stays


@pytest.mark.slow
def test_a_job_whose_s3_lease_is_taken_fails_and_does_not_call_the_output_complete(s3_server,
                                                                                    tiny_models,
                                                                                    tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": f"the cat {i}"} for i in range(200)])
    name = uuid.uuid4().hex
    stored = s3_server["root"] / "bucket" / name  # what the server stores, read here as files
    fs = s3(s3_server["env"])
    other = lease_record()

    def take_the_lease() -> None:  # as another run would, once this one is under way
        deadline = time.time() + 300
        while not (stored / "_manifest.json").exists() and time.time() < deadline:
            time.sleep(0.02)
        fs.pipe(f"bucket/{name}/_lease.json", other)

    taker = threading.Thread(target=take_the_lease, daemon=True)
    taker.start()
    job = start_cli(str(src), f"s3://bucket/{name}/", "--model", str(tiny_models["bert"]),
                    "--id-field", "id", env=s3_server["env"])
    _, err = job.communicate(timeout=300)
    taker.join(10)
    assert job.returncode == 1, err[-2000:]
    line = error_line(err)
    assert line == (f"semvec: error: JobFailed: the lease on s3://bucket/{name}/ was lost to another "
                    "run; stopped so that two runs do not write one prefix")
    assert json.loads((stored / "_manifest.json").read_text())["status"] != "complete"
    assert fs.cat(f"bucket/{name}/_lease.json") == other


# ---------------------------------------------------------------- GPUs on a local Ray


def test_gpus_a_local_ray_cannot_have_are_refused_before_the_lease(tiny_models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat"}])
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, on any machine
    job = subprocess.run([sys.executable, "-m", "semvec.cli", "embed", str(src), str(out), "--model",
                          str(tiny_models["bert"]), "--num-gpus-per-worker", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 2, job.stderr[-2000:]
    lines = job.stderr.strip().splitlines()
    assert lines == ["semvec: error: an encoder pool of 1 asks for 1 GPU(s) but this machine has 0; "
                     "ask for none, or set RAY_ADDRESS to run on a cluster"]
    assert not (out / "_lease.json").exists() and not (out / "_manifest.json").exists()
