"""Fine-tuning survives failures: a SIGKILLed Train worker, and a killed job rerun under its name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semvec.datasets import Task
from semvec.errors import JobFailed
from semvec.train.config import load_train_config
from semvec.train.job import RUN_RECORD, fit
from tests.conftest import crash_after, processes_named
from tests.test_train import make_task_data

pytestmark = pytest.mark.slow


def _wait_for_checkpoint(root: Path, proc_alive, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # the controller's snapshot is written once a reported checkpoint is registered: a kill
        # before that (while the files upload) would rightly restart from scratch
        if any(root.glob("*/checkpoint_manager_snapshot.json")) and any(root.glob("*/checkpoint_*")):
            return
        assert proc_alive(), "training ended before its first checkpoint"
        time.sleep(0.1)
    pytest.fail(f"no checkpoint under {root} after {timeout}s")


def _train_workers() -> list:
    """This test's Train workers: descendants of this process (its local Ray), not another job's."""
    return processes_named("RayTrainWorker")


def _metric_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_killed_worker_resumes_from_last_checkpoint(ray_local, tiny_models, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    train, dev = make_task_data(Task.STS, tmp_path, n_train=480)
    cfg = load_train_config(None, task="sts", method="full", train=str(train), dev=str(dev),
                            output=str(tmp_path / "model"), model=str(tiny_models["bert"]),
                            epochs=2, workers=2, eval_steps=5, patience=100, lr=1e-3)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = fit(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_checkpoint(tmp_path / "model-checkpoints", thread.is_alive)
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    resumed = _metric_history(uri, summary["run_id"], "resumed_from_step")
    assert resumed and min(resumed) > 0, "the restarted workers did not load a checkpoint"
    steps = _metric_history(uri, summary["run_id"], "step")
    # 2 epochs of 240 examples per worker at 16 a batch: the run went on to its last step
    assert max(steps) == 2 * 15
    assert summary["best"]["dev_spearman"] > 0


def test_rerun_with_the_same_name_resumes_a_killed_job_and_a_crashed_publish(ray_local, tiny_models, tmp_path,
                                                                             monkeypatch):
    train, dev = make_task_data(Task.STS, tmp_path, n_train=240)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "semvec.cli", "train", "--task", "sts", "--method", "full",
           "--train", str(train), "--dev", str(dev), "--output", str(tmp_path / "model"),
           "--model", str(tiny_models["bert"]), "--epochs", "2", "--workers", "1",
           "--eval-steps", "5", "--patience", "100", "--lr", "1e-3", "--name", "resumable",
           "--register", "resumable-model", "--json"]
    # its own session, so the kill takes the job's local Ray down with it, as a lost machine would
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(tmp_path / "model-checkpoints", lambda: first.poll() is None)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    assert not (tmp_path / "model" / "semvec.json").exists()

    # a rerun that resumes, trains to the end and is killed right after the first write of the
    # model's publish: the whole model staged beside the output, not yet renamed into place
    second = subprocess.run(cmd, cwd=tmp_path, env={**env, "SEMVEC_CRASH_AT": "1"}, start_new_session=True,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == -9, second.stderr[-2000:]
    assert not (tmp_path / "model").exists()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(staged) == 1 and (staged[0] / "semvec.json").is_file()

    # a rerun killed right after its MLflow run is marked finished (its model logged and registered
    # as v1), before the run's own record says so
    third = subprocess.run(cmd, cwd=tmp_path, start_new_session=True, capture_output=True, text=True,
                           timeout=600, env={**env, **crash_after("mlflow: run finished")})
    assert third.returncode == -9, third.stderr[-2000:]

    # the last rerun in this process, on the tests' Ray: what it resumes from is on disk and in
    # MLflow; it publishes the model and removes the staged copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    summary = fit(load_train_config(
        None, task="sts", method="full", train=str(train), dev=str(dev), output=str(tmp_path / "model"),
        model=str(tiny_models["bert"]), epochs=2, workers=1, eval_steps=5, patience=100, lr=1e-3,
        name="resumable"), register="resumable-model")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("semvec").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]  # one run across the restarts
    assert runs[0].info.status == "FINISHED"
    assert str(summary["registered_version"]) == "1"  # and one version
    assert [str(v.version) for v in client.search_model_versions("name = 'resumable-model'")] == ["1"]
    resumed = _metric_history(uri, summary["run_id"], "resumed_from_step")
    assert resumed and min(resumed) > 0
    assert max(_metric_history(uri, summary["run_id"], "step")) == 2 * 15  # 240 a batch of 16, twice
    assert {"semvec.json", "model.safetensors"} <= {p.name for p in (tmp_path / "model").iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]


def test_a_crash_after_the_stop_note_then_rerun(ray_local, tiny_models, tmp_path, monkeypatch):
    """A loss that is not finite: rank 0's note of it (its one write) is whole after a SIGKILL
    right after it; the rerun under the same name stops at the same step and says so (Ray Train
    keeps only reports with a checkpoint: without the note the driver said only "training stopped
    before the first checkpoint"). A later run of other settings starts afresh, the note's folder
    removed (test_train: a run without a checkpoint is replaced)."""
    train, dev = make_task_data(Task.STS, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"task": "sts", "method": "full", "train": str(train), "dev": str(dev),
                "output": str(tmp_path / "model"), "model": str(tiny_models["bert"]), "epochs": 1,
                "workers": 1, "name": "diverges", "lr": 1e30}
    cmd = [sys.executable, "-m", "semvec.cli", "train",
           *(x for k, v in settings.items() for x in (f"--{k}", str(v)))]
    # its own session, so the crash takes the job's local Ray down with it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "SEMVEC_CRASH_AT": "1"}
    crashed = subprocess.run(cmd, cwd=tmp_path, start_new_session=True, capture_output=True, text=True,
                             timeout=600, env=env)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    note = json.loads((tmp_path / "model-checkpoints" / "diverges" / RUN_RECORD).read_text())["stopped"]
    assert note["reason"] == "nan_loss"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobFailed, match=rf"before the first checkpoint: the loss was not finite at step "
                                        rf"{note['step']} "):
        fit(load_train_config(None, **settings))
    assert not (tmp_path / "model" / "config.json").exists()  # no model exported


def test_checkpoints_replaced_part_way_then_rerun(tmp_path):
    """A finished run's checkpoints are removed before a run of other settings trains afresh; the
    run's record goes last. Killed after the first checkpoint went, a rerun decides as before
    (the earlier run finished: replace) rather than refusing an "unfinished run of other settings"."""
    from semvec.train.job import _keep_or_clear_checkpoints, _read_record

    run_dir = tmp_path / "model-checkpoints" / "run"
    for step in ("checkpoint_000001", "checkpoint_000002"):
        (run_dir / step).mkdir(parents=True)
        (run_dir / step / "model.safetensors").write_bytes(b"x")
    (run_dir / RUN_RECORD).write_text(json.dumps({"settings": "old", "finished": True}))
    script = ("from semvec import crashpoints; from semvec.train.job import _keep_or_clear_checkpoints; "
              f"crashpoints.arm(); _keep_or_clear_checkpoints({str(run_dir)!r}, 'new', 'run', False)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          start_new_session=True,
                          env={**os.environ, **crash_after("train: removed")})
    assert done.returncode == -9, done.stderr[-2000:]
    assert len(list(run_dir.glob("checkpoint_*"))) == 1 and _read_record(str(run_dir))["settings"] == "old"
    record = _keep_or_clear_checkpoints(str(run_dir), "new", "run", False)
    assert record == {"settings": "new", "finished": False}
    assert [p.name for p in run_dir.iterdir()] == [RUN_RECORD]
