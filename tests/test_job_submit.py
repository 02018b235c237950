"""Real job submission: `ray job submit` of the pipelines to a token-authenticated Ray head on loopback.

The head is `ray start --head --block` in a session of its own with a private --temp-dir, so
teardown stops exactly the processes this module started (never `ray stop`). Token authentication
stays on: head and clients get RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN (which Ray prefers
over ~/.ray/auth_token), so a user's ~/.ray/auth_token is neither read nor written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from semvec.datasets import Task
from semvec.testing import corpus_sentences
from tests.conftest import REPO, free_port, write_jsonl
from tests.test_train import make_task_data

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# Ray 2.60 already leaves out what .gitignore (and .rayignore) lists, plus .git, .venv, venv and
# __pycache__ by default; these are named anyway, so that RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 or
# RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES cannot make the upload carry the venv or local runs.
EXCLUDES = ["/.git/", "/.venv/", "/venv/", "/out/", "/mlruns/", "/mlartifacts/", "/mlflow.db",
            "__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/", "/build/", "/dist/"]
PROBE = """import json, os, sys, semvec, pipelines
print("PROBE " + json.dumps({"executable": sys.executable, "semvec": semvec.__file__,
      "cwd": os.getcwd(), "entries": sorted(os.listdir(".")),
      "auth_mode": os.environ.get("RAY_AUTH_MODE"), "hf_offline": os.environ.get("HF_HUB_OFFLINE")}))
"""


class Head:
    def __init__(self, url: str, token: str, client_env: dict, temp_dir: Path, log: Path):
        self.url, self.token, self.client_env, self.temp_dir, self.log = url, token, client_env, temp_dir, log

    def get(self, path: str, token: str | None = "") -> tuple[int, bytes]:
        token = self.token if token == "" else token
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _dashboard_available() -> str | None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _kill_leftovers(marker: str) -> None:
    """Processes of this head that left its process group (found by the private temp dir)."""
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["pid"] != me and marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def ray_head():
    missing = _dashboard_available()
    if missing:
        pytest.fail(f"job submission needs the Ray dashboard, which needs ray[default] "
                    f"(pip install 'ray[default]==2.60.0'): {missing}")
    # short and private: Ray's unix sockets live under it, and the head's processes are marked by it
    temp_dir = Path(tempfile.mkdtemp(prefix="semvec-ray-", dir="/tmp"))
    log = temp_dir / "head.log"
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    base.update({
        # `python` in a job entry point is looked up on the head's PATH: make it this venv's
        "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        # Ray replaces --node-ip-address 127.0.0.1 with the host's routable address (on purpose,
        # for multi-node clusters); as a single-node cluster it keeps every listener on loopback
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # nothing to drain at teardown: skip the up-to-30 s wait for idle leases after the jobs
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    dash = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard=true",
           "--dashboard-agent-listen-port", str(free_port()),
           "--ray-client-server-port", str(free_port()),
           "--num-cpus", "3", "--temp-dir", str(temp_dir)]
    out = open(log, "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=base, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, base, temp_dir, log)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with code {proc.returncode}:\n{head.log_tail()}")
            try:
                if head.get("/api/jobs/")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the job server at {head.url} did not answer in 180s:\n{head.log_tail()}")
            time.sleep(1)
        yield head
    finally:
        # SIGTERM to `ray start --block` alone: it stops its processes in order (a signal to the
        # whole group would kill the GCS under the others)
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its session still running
        except ProcessLookupError:
            pass
        _kill_leftovers(str(temp_dir))
        out.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, entrypoint: list[str], env_vars: dict | None = None,
           timeout: float = 420) -> tuple[dict, str]:
    """`ray job submit`, which waits and tails the logs; returns the job server's record and the output."""
    runtime_env: dict = {"excludes": EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    sid = f"semvec-test-{uuid.uuid4().hex[:8]}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.url, "--submission-id", sid,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    try:
        done = subprocess.run(cmd, env=head.client_env, cwd=head.temp_dir, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", head.url, sid],
                       env=head.client_env, capture_output=True, timeout=60)
        pytest.fail(f"job {sid} still running after {timeout}s:\n{(exc.stdout or b'')[-4000:]!r}")
    output = done.stdout + done.stderr
    code, body = head.get(f"/api/jobs/{sid}")
    assert code == 200, f"GET /api/jobs/{sid} -> {code}: {body[:500]!r}\n{output[-4000:]}"
    job = json.loads(body)
    assert job["status"] == "SUCCEEDED", (
        f"job {sid}: {job['status']} ({job.get('message')}), submit exit {done.returncode}\n"
        f"{output[-6000:]}\n--- head log ---\n{head.log_tail()}")
    assert done.returncode == 0, output[-4000:]
    return job, output


def test_head_is_on_loopback_with_token_auth(ray_head):
    import psutil

    listening = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(ray_head.temp_dir) in " ".join(proc.info["cmdline"] or []):
                listening |= {c.laddr.ip for c in proc.net_connections("inet") if c.status == "LISTEN"}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    assert ray_head.get("/api/jobs/", token=None)[0] == 401
    assert ray_head.get("/api/jobs/", token="0" * 64)[0] in (401, 403)
    assert ray_head.get("/api/jobs/")[0] == 200


def test_job_runs_this_venv_on_the_uploaded_repo(ray_head):
    _, output = submit(ray_head, ["python", "-c", PROBE], timeout=240)
    line = next(x for x in output.splitlines() if x.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert Path(probe["executable"]).parent.resolve() == VENV_BIN.resolve()
    # the job runs in the uploaded copy of the repository, and imports semvec from it
    assert Path(probe["cwd"]).resolve() != REPO.resolve()
    assert Path(probe["semvec"]).resolve() == Path(probe["cwd"]).resolve() / "semvec" / "__init__.py"
    entries = set(probe["entries"])
    assert {"semvec", "pipelines", "pyproject.toml"} <= entries
    assert not entries & {".git", ".venv", "out", "mlruns", "mlflow.db", ".pytest_cache", ".ruff_cache",
                          "semvec.egg-info"}, entries
    assert probe["auth_mode"] == "token"
    assert probe["hf_offline"] == "1"


def test_backfill_job(ray_head, tiny_models, tmp_path):
    texts = corpus_sentences(12, seed=3)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    submit(ray_head, ["python", "-m", "pipelines.backfill", "--config", "pipelines/configs/backfill.yaml",
                      "--input", str(corpus), "--output", str(out), "--model", str(tiny_models["bert"])])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["dim"] == 32
    assert manifest["totals"] == {"rows": len(texts), "embedded": len(texts), "quarantined": 0}
    parts = sorted(out.glob("part-*.parquet"))
    assert parts
    tables = [pq.read_table(p) for p in parts]
    assert sum(t.num_rows for t in tables) == len(texts)
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert sorted(ids) == sorted(f"d{i}" for i in range(len(texts)))
    for t in tables:
        assert t.schema.field("embedding").type.list_size == 32
    assert not list((out / "_quarantine").glob("*.parquet"))


def test_finetune_job(ray_head, tiny_models, tmp_path):
    train, dev = make_task_data(Task.STS, tmp_path / "sts", n_train=32, n_dev=16)
    db = tmp_path / "mlflow.db"
    model = tmp_path / "model"
    # the job's environment is the cluster's plus runtime_env env_vars; the submitting shell's
    # variables do not travel, so the tracking URI goes in env_vars
    submit(ray_head, ["python", "-m", "pipelines.finetune", "--config", "pipelines/configs/finetune.yaml",
                      "--task", "sts", "--method", "lora", "--train", str(train), "--dev", str(dev),
                      "--output", str(model), "--model", str(tiny_models["bert"]), "--epochs", "1",
                      "--workers", "1"],
           env_vars={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert (model / "semvec.json").is_file()
    assert (model / "model.safetensors").is_file()
    with sqlite3.connect(db) as con:
        runs = con.execute("SELECT status FROM runs").fetchall()
    assert runs == [("FINISHED",)]
