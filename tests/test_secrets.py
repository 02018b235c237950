"""Secrets never reach the terminal or a log: redaction, URIs with credentials, one-line errors."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines._job
from semvec import cli, storage
from semvec.config import EmbedConfig
from semvec.errors import ConfigError
from semvec.redact import MASK, RedactingFilter, has_userinfo, redact, setup_logging
from semvec.retrain.lock import LockHeld
from semvec.testing import corpus_sentences
from tests.conftest import REPO, write_jsonl

PASSWORD = "hunter2PW"

# ------------------------------------------------------------------------------- redact()

REDACTED = {
    "mid-sentence s3": ("cannot read s3://AKIAEXAMPLE:wJalrXUtn@bucket/key: AccessDenied",
                        "cannot read s3://***@bucket/key: AccessDenied"),
    "quoted https": ("model 'https://alice:PW@host/model/' is not a directory",
                     "model 'https://***@host/model/' is not a directory"),
    "user only (a token)": ("clone https://ghp_abcdef123456@github.com/o/r.git",
                            "clone https://***@github.com/o/r.git"),
    "raw @ in a password": ("https://bob:p@ss@host/x", "https://***@host/x"),
    "sqlalchemy scheme": ("postgresql+psycopg2://mlflow:s3cr3t@db:5432/mlflow",
                          "postgresql+psycopg2://***@db:5432/mlflow"),
    "databricks": ("databricks://profile:tokenvalue@workspace", "databricks://***@workspace"),
    "presigned URL": (
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F20240101&X-Amz-Expires=60"
        "&X-Amz-Signature=abcdef0123456789 failed",
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Expires=60"
        "&X-Amz-Signature=*** failed"),
    "query token": ("http://host/api?page=2&token=s3cr3tvalue&key=abc123",
                    "http://host/api?page=2&token=***&key=***"),
    "key=value text": ("connect host=db password=hunter22 user=me",
                       "connect host=db password=*** user=me"),
    "cli flag": ("ray start --token=abcdef123456", "ray start --token=***"),
    "bearer": ("Authorization: Bearer eyJhbGciOi.payload.sig", "Authorization: Bearer ***"),
}

UNCHANGED = [
    "models:/semvec-sts@champion",
    "models:/semvec-sts/3",
    "s3://bucket/prefix/part-0.parquet",
    "http://127.0.0.1:5000/health",
    "batch_tokens=1024 max_length=128 lease_ttl_s=120",
    "Token authentication stays on; write to bob@example.com",
    "unknown pooling 'avg'; allowed: auto, mean, cls, max, last",
]


@pytest.mark.parametrize("text, want", REDACTED.values(), ids=REDACTED.keys())
def test_redact_masks_credentials_anywhere_in_a_text(text, want):
    assert redact(text) == want


@pytest.mark.parametrize("text", UNCHANGED)
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_redact_masks_the_values_of_secret_environment_variables(monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "HF_TOKEN": "hf_abcdefgh",
               "MLFLOW_TRACKING_PASSWORD": "correct horse", "ACME_DB_PASSWORD": "pa55word",
               "ACME_SECRET": "opensesame", "ACME_SECRET_ACCESS_KEY": "k3yk3yk3y"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACME_TOKEN", "abc")  # too short to mask without mangling text
    monkeypatch.setenv("ACME_REGION", "eu-central-1")  # not a secret
    text = " | ".join([*secrets.values(), "wJalrXUtnFEMI%2FK7MDENG", "abc", "eu-central-1"])
    assert redact(text) == " | ".join([MASK] * (len(secrets) + 1) + ["abc", "eu-central-1"])


def test_display_and_userinfo_detection():
    assert storage.display("s3://key:secret@bucket/x/") == "s3://***@bucket/x/"
    assert storage.display("s3://bucket/x/") == "s3://bucket/x/"
    assert has_userinfo("gs://alice@b/out") and not has_userinfo("models:/m@champion")


@pytest.mark.parametrize("uri", [f"s3://alice:{PASSWORD}@bucket/in/", f"https://alice:{PASSWORD}@host/c",
                                 f"gs://alice:{PASSWORD}@b/out/", "s3://AKIAEXAMPLE@bucket/in/"])
def test_filesystem_refuses_credentials_in_any_uri(uri):
    with pytest.raises(ConfigError, match="credentials in a URI are not accepted") as err:
        storage.filesystem(uri)
    assert PASSWORD not in str(err.value) and "AKIA" not in str(err.value)


# ------------------------------------------------------------------------------- logging


@pytest.fixture
def semvec_logger(monkeypatch):
    """setup_logging changes process-wide state: put it back afterwards."""
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "-")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL")  # unset now, and restored to the original after
    loggers = [logging.getLogger(n) for n in ("semvec", "mlflow", "alembic")]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in loggers]
    yield logging.getLogger("semvec")
    for lg, handlers, filters, level, propagate in saved:
        lg.handlers, lg.filters, lg.level, lg.propagate = handlers, filters, level, propagate


def test_setup_logging_redacts_every_semvec_record_and_quiets_mlflow(semvec_logger, capsys):
    setup_logging(verbose=False)
    setup_logging(verbose=False)  # idempotent: one handler (pytest may have put its own beside it)
    ours = [h for h in semvec_logger.handlers if h.get_name() == "semvec-redacting"]
    assert len(ours) == 1 and not semvec_logger.propagate
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("mlflow").level == logging.WARNING
    child = logging.getLogger("semvec.backfill")  # a child: the logger's own filter never sees it
    try:
        raise OSError(f"denied for s3://k:{PASSWORD}@bucket/x")
    except OSError:
        child.exception("reading %s", f"https://alice:{PASSWORD}@host/in.jsonl")
    err = capsys.readouterr().err
    assert "reading https://***@host/in.jsonl" in err and "denied for s3://***@bucket/x" in err
    assert PASSWORD not in err


def test_redacting_filter_on_any_handler():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("semvec-test-redact")
    logger.addHandler(handler)
    try:
        logger.warning("token=%s at %s", "abcdef123456", f"s3://u:{PASSWORD}@b/")
        logger.warning("a bad format %s %s", "one")  # must not raise from the filter
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines()[0] == "token=*** at s3://***@b/"
    assert PASSWORD not in stream.getvalue()


# ------------------------------------------------------------------------------- one-line errors


def _raise(exc: BaseException):
    raise exc


ERRORS = {
    "config": (ConfigError(f"input 's3://a:{PASSWORD}@b/x' is bad\nsecond line"), 2,
               "semvec: error: input 's3://***@b/x' is bad second line"),
    "lock held": (LockHeld("another retrain holds the lock"), 3,
                  "semvec: error: another retrain holds the lock"),
    "any other": (RuntimeError(f"boom at https://u:{PASSWORD}@h/x\n  more detail"), 1,
                  "semvec: error: RuntimeError: boom at https://***@h/x"),
    "no message": (ValueError(), 1, "semvec: error: ValueError"),
    "interrupt": (KeyboardInterrupt(), 130, "semvec: interrupted"),
}


@pytest.mark.parametrize("exc, code, line", ERRORS.values(), ids=ERRORS.keys())
def test_every_error_is_one_redacted_line(monkeypatch, capsys, semvec_logger, exc, code, line):
    monkeypatch.setitem(cli.COMMANDS, "rollback", lambda args: _raise(exc))
    assert cli.main(["rollback", "m"]) == code
    assert capsys.readouterr().err.splitlines() == [line]

    assert cli.main(["-v", "rollback", "m"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == line
    assert PASSWORD not in err

    # the Ray job entry points end the same way
    assert pipelines._job.main("doc", EmbedConfig, lambda args, overrides: _raise(exc),
                               ["--config", "x.yaml"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as end:
        cli.main(["embed", "--no-such-flag", f"https://u:{PASSWORD}@h/x"])
    err = capsys.readouterr().err
    assert end.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("semvec: error: unrecognized arguments") and PASSWORD not in err


# ------------------------------------------------------------------------------- the real console script


def _run(*args: str, cwd: Path = REPO, drop: tuple[str, ...] = (), module: str = "semvec.cli",
         timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _assert_one_clean_line(result: subprocess.CompletedProcess, message: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semvec: error: ") and message in lines[0], lines
    assert "PW" not in out and "hunter2" not in out and "Traceback" not in out


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_sentences(5)])


def test_credentials_in_input_output_and_model_references(tmp_path, corpus, tiny_bert):
    out = str(tmp_path / "out")
    cases = {
        "input": ([f"https://alice:{PASSWORD}@host/c.jsonl", out], "credentials in a URI are not accepted"),
        "output": ([str(corpus), f"gs://alice:{PASSWORD}@b/out/", "--model", str(tiny_bert)],
                   "credentials in a URI are not accepted"),
        "model": ([str(corpus), out, "--model", f"https://alice:{PASSWORD}@host/model/"],
                  "model 'https://***@host/model/' is not a directory"),
    }
    for name, (args, message) in cases.items():
        result = _run("embed", *args)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        _assert_one_clean_line(result, message)


def test_credentials_in_an_s3_uri_with_aws_variables_set(s3_env):
    # With real AWS variables, s3fs used to try the URI's userinfo and end in a botocore traceback.
    result = _run("embed", f"s3://alice:{PASSWORD}@bucket/in/", "s3://bucket/out/")
    _assert_one_clean_line(result, "credentials in a URI are not accepted")
    assert s3_env["secret"] not in result.stdout + result.stderr


def test_the_pipeline_entry_point_refuses_credentials_too(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: https://alice:{PASSWORD}@host/c.jsonl\noutput: {tmp_path}/out\n")
    result = _run("--config", str(cfg), module="pipelines.backfill")
    _assert_one_clean_line(result, "credentials in a URI are not accepted")


def test_a_registry_model_without_a_tracking_server_creates_no_store(tmp_path, corpus):
    work = tmp_path / "work"
    work.mkdir()
    result = _run("embed", str(corpus), str(tmp_path / "out"), "--model", "models:/semvec-sts@champion",
                  cwd=work, drop=("MLFLOW_TRACKING_URI",))
    _assert_one_clean_line(result, "MLFLOW_TRACKING_URI is not set")
    assert "INFO" not in result.stdout + result.stderr
    assert list(work.iterdir()) == [], "resolving a model created files in the working directory"
