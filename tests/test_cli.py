"""Bad arguments: exit code 2 and one line naming the value, before Ray starts."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semvec.cli import main
from semvec.config import load_embed_config
from semvec.errors import ConfigError
from semvec.testing import corpus_sentences
from tests.conftest import REPO, write_jsonl


def semvec(*args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "semvec.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=full_env, timeout=timeout)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_sentences(5)])


def _cases(tmp_path: Path, corpus: Path, model: Path) -> dict:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"")
    (broken / "tokenizer.json").write_text("{}")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so nothing can be created beneath it")
    out = str(tmp_path / "out")
    return {
        "missing input": ([str(tmp_path / "nope.jsonl"), out], "does not exist"),
        "empty folder": ([str(tmp_path / "empty"), out], "holds no data files"),
        "empty file": ([str(tmp_path / "empty.jsonl"), out], "only empty files"),
        "unknown pooling": (
            [str(corpus), out, "--pooling", "avg"], "unknown pooling 'avg'; allowed: auto, mean"),
        "unknown granularity": ([str(corpus), out, "--granularity", "word"], "unknown granularity"),
        "missing model": ([str(corpus), out, "--model", str(tmp_path / "none")], "is not a directory"),
        "unreadable model": ([str(corpus), out, "--model", str(broken)], "cannot be loaded"),
        "output not writable": ([str(corpus), str(blocked / "out"), "--model", str(model)], "not writable"),
        "bad number": ([str(corpus), out, "--batch-rows", "0"], "batch_rows must be a positive integer"),
        "bad share": ([str(corpus), out, "--max-failed-share", "1.5"], "max_failed_share must be a number"),
        "unknown scheme": ([str(corpus), "gs://bucket/x", "--model", str(model)], "unsupported URI scheme"),
    }


def test_bad_arguments_exit_2_with_one_line(tmp_path, corpus, tiny_bert, capsys):
    for name, (args, message) in _cases(tmp_path, corpus, tiny_bert).items():
        code = main(["embed", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and message in err, (name, err)


def test_the_console_script_exits_2_before_starting_ray(tmp_path, corpus):
    start = time.time()
    result = semvec("embed", str(corpus), str(tmp_path / "out"), "--pooling", "avg")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "semvec: error: unknown pooling 'avg'; allowed: auto, mean, cls, max, last"]
    assert "ray" not in result.stdout.lower() and time.time() - start < 60


def test_yaml_config_and_overrides(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: a.jsonl\noutput: out\npooling: cls\nmax_workers: 3\n")
    c = load_embed_config(cfg, pooling="max")
    assert c.pooling.value == "max" and c.max_workers == 3
    cfg.write_text("input: a.jsonl\noutput: out\npoolin: cls\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_embed_config(cfg)


def test_pipeline_entry_point_reports_bad_config(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {tmp_path}/missing.jsonl\noutput: {tmp_path}/out\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.backfill", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr
