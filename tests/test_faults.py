"""Faults beyond the driver, on real pieces: an encoder actor SIGKILLed mid-job, a Ray node lost
mid-job on a two-node cluster, the S3 server killed and restarted mid-job, and a second run into
an S3 prefix that one is writing. Each job ends with exactly the rows, vectors, quarantine and
counts of an uninterrupted run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semvec.backfill.job import run
from semvec.config import load_embed_config
from tests.conftest import REPO, S3Server, processes_named
from tests.node_loss_job import OPTS
from tests.test_exactly_once import assert_same, bad_and_good_corpus, snapshot, start_cli

pytestmark = pytest.mark.slow

ROWS = 4_000  # 16 parts of 250: a fault after the first few leaves most of the job still to do
PARTS = ROWS // OPTS["rows_per_file"]


def cli_args(model: Path) -> list[str]:
    """The faulted runs' flags: on Ray, however small the corpus (the reference runs in the
    test's process without Ray: the two ways must agree)."""
    flags = {"model": str(model), **OPTS, "ray_from_rows": 1}
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def corpus(ray_local, tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    """The input every fault test runs (bad rows among good ones) and its uninterrupted output."""
    root = tmp_path_factory.mktemp("faults")
    src = bad_and_good_corpus(root / "in.jsonl", ROWS, every=7)
    run(load_embed_config(None, input=str(src), output=str(root / "ref"),
                          model=str(tiny_models["bert"]), **OPTS))
    return src, snapshot(root / "ref")


def wait_for(ready, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the job ended before the fault: {proc.stderr.read()[-1500:]}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.05)


def wait_for_parts(out: Path, n: int, proc: subprocess.Popen) -> None:
    wait_for(lambda: len(glob.glob(str(out / "part-*.parquet"))) >= n, proc)


def test_an_encoder_actor_killed_mid_job_is_replaced_and_every_row_lands_once(corpus, tiny_models,
                                                                               tmp_path):
    src, want = corpus
    out = tmp_path / "out"
    proc = start_cli(str(src), str(out), *cli_args(tiny_models["bert"]))
    wait_for_parts(out, 3, proc)
    actors = processes_named("EncodeActor", proc.pid)
    assert actors, "no encoder actor found under the job's process tree"
    for actor in actors:  # every one of them: the pool must start new ones
        actor.send_signal(signal.SIGKILL)
    assert proc.poll() is None and len(glob.glob(str(out / "part-*.parquet"))) < PARTS
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert_same(snapshot(out), want)


def test_s3_server_killed_and_restarted_mid_job_and_a_second_run_refused(corpus, tiny_models,
                                                                         tmp_path):
    src, want = corpus
    server = S3Server(tmp_path / "s3").start()
    try:
        (server.root / "bucket" / "in").mkdir()
        (server.root / "bucket" / "in" / "in.jsonl").write_bytes(src.read_bytes())
        out = server.root / "bucket" / "out"  # what the server stores, read here as files
        args = ["s3://bucket/in/", "s3://bucket/out/", *cli_args(tiny_models["bert"])]
        env = {**server.env, "SEMVEC_CACHE": str(tmp_path / "cache")}
        first = start_cli(*args, env=env)
        wait_for(lambda: (out / "_lease.json").exists(), first)
        # a second run into the prefix being written: refused before any work, one line, exit 3
        second = subprocess.run([sys.executable, "-m", "semvec.cli", "embed", *args], cwd=REPO,
                                env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 3 and len(lines) == 1, second.stderr[-1500:]
        assert "held by another backfill" in lines[0] and server.secret not in lines[0]
        # the store goes away mid-job and comes back: reads and writes wait with backoff
        wait_for_parts(out, 2, first)
        server.kill()
        down = time.time()
        time.sleep(5)
        assert first.poll() is None, "the job did not wait for the store"
        server.start()
        _, err = first.communicate(timeout=420)
        assert first.returncode == 0, err[-2500:]
        assert time.time() - down > 5
        assert_same(snapshot(out), want)
        assert server.secret not in err
    finally:
        server.stop()


def test_a_ray_node_lost_mid_job_the_job_completes_on_the_remaining_node(corpus, tiny_models,
                                                                         tmp_path):
    src, want = corpus
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.run([sys.executable, "-m", "tests.node_loss_job", str(src), str(out),
                          str(tiny_models["bert"]), str(tmp_path / "report.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert job.returncode == 0, job.stderr[-2500:]
    report = json.loads((tmp_path / "report.json").read_text())
    lost = report["lost"]
    # the node held an encoder actor and went away with at least a quarter of the work still to do
    # (its actor starts late on a loaded machine: once 8 of 16 parts were in before it did)
    assert lost.get("actors_on_node", 0) >= 1, job.stderr[-2500:]
    assert lost["parts_before"] <= PARTS * 3 // 4 and lost["node_processes_left"] == 0
    assert report["summary"]["rows"] == ROWS
    assert_same(snapshot(out), want)
