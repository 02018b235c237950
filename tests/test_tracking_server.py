"""MLflow through a real tracking server whose artifacts live on the S3-compatible server."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from semvec.datasets import Task
from semvec.train.config import load_train_config
from semvec.train.job import fit
from tests.conftest import cli, crash_after, write_jsonl
from tests.test_train import make_task_data

pytestmark = pytest.mark.slow


def test_train_registers_on_a_server_with_s3_artifacts_and_embed_loads_the_alias(
    ray_local, tiny_models, tmp_path, monkeypatch, mlflow_server, s3_server, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    train, dev = make_task_data(Task.STS, tmp_path)
    summary = fit(load_train_config(None, task="sts", method="lora", train=str(train), dev=str(dev),
                                    output=str(tmp_path / "model"), model=str(tiny_models["bert"]),
                                    epochs=2, workers=2, lr=5e-3),
                  register="tiny-sts-server")
    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "lora"
    assert "dev_spearman" in run.data.metrics
    assert len(client.get_metric_history(summary["run_id"], "dev_spearman")) == 2  # one per epoch
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    # the model's files are on the S3 server, under the server's artifact destination
    stored = {p.name for p in mlflow_server["artifacts"].rglob("*") if p.is_file()}
    assert {"model.safetensors", "semvec.json", "dev_report.json", "train_config.json"} <= stored
    # no secret of the S3 server reached MLflow
    everything = json.dumps([run.data.params, run.data.tags])
    assert s3_server["secret"] not in everything
    version = summary["registered_version"]
    client.set_registered_model_alias("tiny-sts-server", "champion", version)

    # a client with no S3 credentials embeds with the registered alias: the model is fetched in
    # this process (the driver), through the server, with every AWS_* variable unset here; the
    # Ray workers are handed the fetched local copy and read nothing from the store
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "the cat sat on the red mat"}, {"text": "dog"}])
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEMVEC_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "embed", str(corpus), str(tmp_path / "v"),
                         "--model", "models:/tiny-sts-server@champion", "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["embedded"] == 2  # stdout: the JSON line alone
    manifest = json.loads((tmp_path / "v" / "_manifest.json").read_text())
    assert "models:/tiny-sts-server@champion" in json.dumps(manifest)


def test_a_sqlite_store_keeps_artifacts_beside_its_file(tmp_path, monkeypatch):
    from semvec import tracking

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    elsewhere = tmp_path / "job-working-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as under `ray job submit`: a temporary copy of the repo
    tracker = tracking.start_run("artifacts-here", "r", {"a": 1})
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((db.parent / "mlartifacts").as_uri())


def test_register_cut_short_anywhere_then_rerun_makes_one_version(tiny_models, tmp_path, monkeypatch,
                                                                  mlflow_server):
    """`semvec register` killed right after its run is created (before its params), after its
    version is made, then after the alias is set: each rerun finds the run and the version it made
    (the same model files), so the registry ends as after one uncut run: one run with its params,
    one version, the alias on it."""
    import subprocess
    import sys

    from semvec import models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    name = "tiny-register-crash"
    args = [sys.executable, "-m", "semvec.cli", "register", str(tiny_models["bert"]), "--name", name,
            "--alias", "champion"]
    for write in ("mlflow: run created", "registered", "@champion"):
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, start_new_session=True,
                              env={**os.environ, **crash_after(write)})
        assert done.returncode == -9, f"no crash after {write!r}: {done.stderr[-2000:]}"
    assert models.register_model(str(tiny_models["bert"]), name, "champion") == "1"
    client = MlflowClient(mlflow_server["uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    experiment = client.get_experiment_by_name("semvec").experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.runName` = 'register-{name}'")
    assert len(runs) == 1 and set(runs[0].data.params) == {"model", "fingerprint"}
