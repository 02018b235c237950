"""MLflow with authentication: a real `mlflow server --app-name basic-auth` on loopback, set up as
the Kubernetes manifests set it up (infra/mlflow_auth.py writes its ini and makes the reader and
the writer). The writer trains and registers; both roles resolve models:/NAME@champion (the reader
through a whole `semvec embed`); the reader cannot move @champion; a missing or wrong login ends
in one line and exit code 2; no password reaches an output, a log or MLflow.

One server for the module, and one small training (in a `semvec train` process of its own, so that
its Ray workers hold the writer's login as a cluster's do) shared by the tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from semvec.datasets import Task
from tests.conftest import REPO, cli, free_port, wait_for_http, write_jsonl
from tests.test_train import make_task_data

pytestmark = pytest.mark.slow

MODEL = "tiny-sts-auth"
SCRIPT = REPO / "infra" / "mlflow_auth.py"
ROLES = ("admin", "reader", "writer")
# what a job's environment must not carry into another login: this process's own settings
FOREIGN = ("MLFLOW_", "AWS_", "SEMVEC_MLFLOW_", "RAY_ADDRESS")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment less any MLflow setting or S3 key, plus extra."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}, **extra}


@contextlib.contextmanager
def _environment(**values: str):
    """In this process: the MLflow settings are exactly `values` (MlflowClient reads the login
    from the environment at each request)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith(FOREIGN)]:
            mp.delenv(name)
        for name, value in values.items():
            mp.setenv(name, value)
        yield


def _run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def _auth_script():
    """infra/mlflow_auth.py, the code the Kubernetes init container and users Job run."""
    spec = importlib.util.spec_from_file_location("semvec_infra_mlflow_auth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _login(server: dict, role: str, password: str | None = None) -> dict[str, str]:
    """The environment a job of this role gets from its Secret (a wrong password when given)."""
    return {"MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_TRACKING_USERNAME": f"semvec-{role}",
            "MLFLOW_TRACKING_PASSWORD": password or server["passwords"][role]}


def _assert_no_password(server: dict, *texts: str) -> None:
    for text in texts:
        for role, password in server["passwords"].items():
            assert password not in text, f"the {role}'s password was shown"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The server with its admin, and the reader and writer that `mlflow_auth.py users` makes."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    passwords = {role: f"{role}-{uuid.uuid4().hex}" for role in ROLES}
    # users and grants in the tracking database, as in infra/k8s/mlflow.yaml (Postgres there)
    store = f"sqlite:///{root / 'mlflow.db'}"
    script, ini = _auth_script(), root / "auth" / "basic_auth.ini"
    with _environment(MLFLOW_BACKEND_STORE_URI=store):
        script.write_ini(ini)
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=_clean_env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME="admin",
                       MLFLOW_AUTH_ADMIN_PASSWORD=passwords["admin"],
                       MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
                       MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # as deployed
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    server = {"uri": uri, "passwords": passwords, "log": root / "server.log"}
    try:
        wait_for_http(f"{uri}/health", proc, 180, "mlflow server --app-name basic-auth")
        users = {f"SEMVEC_MLFLOW_{role.upper()}_{key}": value for role in ("reader", "writer")
                 for key, value in (("USERNAME", f"semvec-{role}"), ("PASSWORD", passwords[role]))}
        with _environment(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="admin",
                          MLFLOW_TRACKING_PASSWORD=passwords["admin"], SEMVEC_MLFLOW_MODELS=MODEL,
                          **users):
            made = script.setup_users()
        assert made["users"]["reader"]["registered_model"] == "READ"
        _assert_no_password(server, json.dumps(made))
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # uvicorn can wait on open connections
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def champion(auth_server, tiny_models, tmp_path_factory) -> dict:
    """The writer trains and registers MODEL and points @champion (and @previous, so that a
    rollback has somewhere to go) at the new version."""
    from mlflow.tracking import MlflowClient

    from semvec import tracking

    with _environment(**_login(auth_server, "reader")):  # granted before it exists: "none yet"
        assert tracking.alias_version(MODEL, "champion") is None
    root = tmp_path_factory.mktemp("auth-train")
    train, dev = make_task_data(Task.STS, root, n_train=32, n_dev=16)
    # Ray's session files (logs included) in a folder of this test; short, for Ray's socket paths
    ray_tmp = tempfile.mkdtemp(prefix="rayauth-", dir="/tmp")
    trained = _run(["-m", "semvec.cli", "train", "--task", "sts", "--method", "full",
                    "--train", str(train), "--dev", str(dev), "--output", str(root / "model"),
                    "--model", str(tiny_models["bert"]), "--epochs", "1", "--register", MODEL,
                    "--json"], _clean_env(**_login(auth_server, "writer"), RAY_TMPDIR=ray_tmp),
                   timeout=600)
    ray_logs = [p.read_text(errors="replace") for p in Path(ray_tmp).rglob("*")
                if p.is_file() and p.suffix in (".log", ".out", ".err")]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # the worker's progress line reaches the user once (Ray Train's print patch had doubled it)
    assert (trained.stdout + trained.stderr).count("semvec train: epoch 1.00 ") == 1
    assert ray_logs, "no Ray log was read"
    _assert_no_password(auth_server, trained.stdout, trained.stderr, *ray_logs)
    summary = json.loads(trained.stdout)
    version = summary["registered_version"]
    with _environment(**_login(auth_server, "writer")):
        client = MlflowClient(auth_server["uri"])
        client.set_registered_model_alias(MODEL, "champion", version)
        client.set_registered_model_alias(MODEL, "previous", version)
        run = client.get_run(summary["run_id"])
    assert run.data.params["method"] == "full"
    _assert_no_password(auth_server, json.dumps([run.data.params, run.data.tags]))
    corpus = write_jsonl(root / "c.jsonl", [{"text": "the cat sat on the mat"}, {"text": "dog"}])
    return {"version": version, "corpus": corpus}


def _embed(env: dict, out: Path, corpus: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "semvec.cli", "embed", str(corpus), str(out), "--model",
                 f"models:/{MODEL}@champion", "--json"],
                _clean_env(**env, SEMVEC_CACHE=str(out.parent / f"cache-{out.name}")))


def test_the_reader_embeds_and_the_writer_resolves_the_champion(ray_local, auth_server, champion,
                                                                tmp_path, capsys):
    from semvec import models

    # the whole command in this process, on the tests' Ray: the model is resolved here, on the driver
    with _environment(**_login(auth_server, "reader"), SEMVEC_CACHE=str(tmp_path / "cache-reader")):
        code, out, err = cli(capsys, "embed", str(champion["corpus"]), str(tmp_path / "v"), "--model",
                             f"models:/{MODEL}@champion", "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["embedded"] == 2
    manifest = json.loads((tmp_path / "v" / "_manifest.json").read_text())
    assert manifest["model"]["reference"] == f"models:/{MODEL}@champion"
    _assert_no_password(auth_server, out, err, json.dumps(manifest))
    # the writer's login resolves the same model (what `semvec embed` does first, on its driver)
    with _environment(**_login(auth_server, "writer"), SEMVEC_CACHE=str(tmp_path / "cache-writer")):
        model_dir = models.resolve_model(f"models:/{MODEL}@champion")
    assert models.fingerprint(model_dir) == manifest["model"]["fingerprint"]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The command's error: exit code 2, no traceback, one line from semvec, and it is the last."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("semvec:")]
    assert len(ours) == 1 and result.stderr.strip().splitlines()[-1] == ours[0], result.stderr[-2000:]
    assert ours[0].startswith("semvec: error: MLflow at "), ours[0]
    return ours[0]


def test_the_reader_cannot_move_the_champion(auth_server, champion):
    # `semvec rollback` points @champion at @previous: the server refuses the reader's request
    result = _run(["-m", "semvec.cli", "rollback", MODEL], _clean_env(**_login(auth_server, "reader")))
    line = _one_error_line(result)
    assert "user 'semvec-reader' is not permitted" in line and "HTTP 403" in line, line
    assert "registered-models/alias" in line, line
    _assert_no_password(auth_server, result.stdout, result.stderr)
    from semvec import tracking

    with _environment(**_login(auth_server, "reader")):
        assert tracking.alias_version(MODEL, "champion") == champion["version"]


@pytest.mark.parametrize("login", ["none", "wrong password"])
def test_a_missing_or_wrong_login_is_one_line_and_exit_code_2(auth_server, champion, login, tmp_path):
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = ({"MLFLOW_TRACKING_URI": auth_server["uri"]} if login == "none"
           else _login(auth_server, "reader", password=wrong))
    result = _embed(env, tmp_path / "v", champion["corpus"])
    line = _one_error_line(result)
    if login == "none":
        assert "needs a login (HTTP 401" in line and "set MLFLOW_TRACKING_USERNAME" in line, line
    else:
        assert "refused the login of user 'semvec-reader': wrong username or password" in line, line
    assert wrong not in result.stdout + result.stderr
    assert not (tmp_path / "v").exists()  # refused before any work
    _assert_no_password(auth_server, result.stdout, result.stderr, auth_server["log"].read_text())


def test_the_submitters_check_tells_a_missing_alias_from_a_missing_grant(auth_server):
    """`infra/mlflow_auth.py check` (the retrain CronJob's first step): the server answers 403 for
    a model the user has no grant on, existing or not; a granted model without the alias is named."""
    reader = _clean_env(**_login(auth_server, "reader"))
    result = _run([str(SCRIPT), "check", "semvec-sts-not-granted"], reader)
    assert result.returncode == 2, result.stderr
    assert "user 'semvec-reader' is not permitted" in result.stderr.strip().splitlines()[-1]
    result = _run([str(SCRIPT), "check", MODEL, "--alias", "nightly"], reader)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "has no @nightly" in line and "register one first" in line, line
    _assert_no_password(auth_server, result.stdout, result.stderr)


def test_the_basic_auth_secrets_are_masked(monkeypatch):
    from semvec.redact import MASK, redact

    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "SEMVEC_MLFLOW_WRITER_PASSWORD"):
        monkeypatch.setenv(name, f"{name.lower()}-value")
        assert redact(f"x {name.lower()}-value y") == f"x {MASK} y", name
