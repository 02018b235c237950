"""Bad arguments: exit code 2 and one line naming the value, before Ray starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from semvec.cli import main
from semvec.config import load_embed_config
from semvec.errors import ConfigError
from semvec.testing import corpus_sentences
from tests.conftest import REPO, own_lines, write_jsonl


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
    lines = tmp_path / "lines.txt"
    lines.write_text("one text\nanother\n")
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
        "output beneath a file": ([str(corpus), str(blocked / "out"), "--model", str(model)],
                                  f"output '{blocked / 'out'}' lies beneath the file '{blocked}'"),
        "output is a file": ([str(corpus), str(blocked), "--model", str(model)],
                             "is a file; an output is a folder"),
        "output is the input": ([str(corpus), str(corpus), "--model", str(model)],
                                "is the input"),
        "an id field in a text file": ([str(lines), out, "--model", str(model), "--id-field", "id"],
                                       "is text, a line a row, with no fields: --id-field needs"),
        # the setting's name (as in a config file) and the flag this command sets it with
        "bad number": ([str(corpus), out, "--batch-rows", "0"],
                       "batch_rows (--batch-rows) must be a positive integer"),
        "bad share": ([str(corpus), out, "--max-failed-share", "1.5"],
                      "max_failed_share (--max-failed-share) must be a number"),
        "jsonl field typo": ([str(corpus), out, "--text-field", "body", "--model", str(model)],
                             "has no field 'body' in its first 5 object(s) (their fields: 'text'); "
                             "name the field with --text-field"),
        "unknown scheme": ([str(corpus), "gs://bucket/x", "--model", str(model)], "unsupported URI scheme"),
    }


def test_bad_arguments_exit_2_with_one_line(tmp_path, corpus, tiny_bert, capsys):
    for name, (args, message) in _cases(tmp_path, corpus, tiny_bert).items():
        code = main(["embed", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and message in err, (name, err)


def test_the_console_script_exits_2_before_starting_ray(tmp_path, corpus):
    ray_tmp = tmp_path / "ray"  # a Ray started by this command would make its session folder here
    result = semvec("embed", str(corpus), str(tmp_path / "out"), "--pooling", "avg",
                    env={"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "semvec: error: unknown pooling 'avg'; allowed: auto, mean, cls, max, last"]
    assert not ray_tmp.exists() and not (tmp_path / "out").exists()


def _options(parser) -> list:
    """(command, action) for every option of every (sub)command."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{parser.prog} {name}".split(" ", 1)[-1], a) for _, a in _options(sub)]
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            found.append((parser.prog, action))
    return found


def test_every_option_has_help_and_says_its_default():
    from semvec.cli import build_parser

    options = _options(build_parser())
    assert len(options) > 80
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in options if not (a.help or "").strip()]
    assert not missing, missing
    # a flag with a default says what it is; one without says what happens when it is not given
    for cmd, a in options:
        if a.option_strings and a.dest not in ("verbose", "json"):
            assert "default" in a.help or "required" in a.help, f"{cmd} {a.option_strings}: {a.help}"


def test_help_and_version_describe_the_product(capsys):
    from semvec import __version__

    for argv, expected in ((["--help"], "semantic vectors from language models"),
                           (["--version"], f"semvec {__version__}"),
                           (["embed", "--help"], "--max-failed-share FLOAT"),
                           (["train", "--help"], "--weight-decay FLOAT")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert expected in capsys.readouterr().out
    assert "call one function" not in build_help()


def build_help() -> str:
    from semvec.cli import build_parser

    return build_parser().format_help()


def test_train_flags_reach_the_config_and_foreign_method_options_are_refused(tmp_path, capsys):
    from semvec.cli import build_parser
    from semvec.options import given
    from semvec.train.config import load_train_config

    args = build_parser().parse_args(["train", "--task", "sts", "--method", "lora", "--train", "t.jsonl",
                                      "--output", "o", "--weight-decay", "0.2", "--warmup-ratio", "0.3",
                                      "--keep-checkpoints", "4", "--lora-r", "4", "--freeze-layers", "1"])
    cfg = load_train_config(None, **given(args, args.config_fields),
                            method_options=given(args, args.method_fields))
    assert (cfg.weight_decay, cfg.warmup_ratio, cfg.keep_checkpoints) == (0.2, 0.3, 4)
    assert cfg.method_config().lora_r == 4 and cfg.method_config().freeze_layers == 1
    code = main(["train", "--task", "sts", "--method", "full", "--train", "t.jsonl", "--output",
                 str(tmp_path / "o"), "--prompt-tokens", "4"])
    err = own_lines(capsys.readouterr().err)
    assert code == 2 and err == [
        "semvec: error: method option(s) prompt_tokens (--prompt-tokens) do not apply to method full"]


def test_yaml_config_and_overrides(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: a.jsonl\noutput: out\npooling: cls\nmax_workers: 3\n")
    c = load_embed_config(cfg, pooling="max")
    assert c.pooling.value == "max" and c.max_workers == 3
    cfg.write_text("input: a.jsonl\noutput: out\npoolin: cls\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_embed_config(cfg)


def test_a_whole_number_for_a_float_setting_is_the_same_setting(tmp_path):
    """YAML's `l2sp: 1` and the flag's 1.0 make one config: its params in MLflow and the hash that
    decides whether a rerun resumes a run's checkpoints read the same."""
    from semvec.train.config import load_train_config
    from semvec.train.job import settings_hash

    cfg = tmp_path / "train.yaml"
    cfg.write_text("task: sts\nmethod: lora\ntrain: t.jsonl\noutput: o\nl2sp: 1\nlr: 1\n"
                   "method_options: {lora_dropout: 0}\n")
    from_yaml = load_train_config(cfg)
    from_flags = load_train_config(None, task="sts", method="lora", train="t.jsonl", output="o", l2sp=1.0,
                                   lr=1.0, method_options={"lora_dropout": 0.0})
    assert from_yaml.to_dict() == from_flags.to_dict()
    assert type(from_yaml.l2sp) is float and type(from_yaml.method_options["lora_dropout"]) is float
    assert from_yaml.seed == 42 and type(from_yaml.seed) is int  # int settings stay ints
    p = {"fingerprint": "f", "dev_corpus": None, "replay_digest": None}
    assert settings_hash(from_yaml, p, [], []) == settings_hash(from_flags, p, [], [])
    assert settings_hash(from_yaml, p, [], []) != settings_hash(load_train_config(cfg, l2sp=2), p, [], [])


def test_a_yaml_number_with_an_exponent_is_a_number(tmp_path):
    """`lr: 2e-5` in a config file, as people write a learning rate: PyYAML (YAML 1.1) read it as
    the string '2e-5' and the config refused it. Ints, dotted floats and words stay as they were."""
    from semvec.cli import build_parser
    from semvec.config import load_yaml
    from semvec.train.config import load_train_config

    cfg = tmp_path / "train.yaml"
    cfg.write_text("task: sts\nmethod: full\ntrain: t.jsonl\noutput: o\nlr: 2e-5\nwarmup_ratio: 1E-1\n")
    loaded = load_train_config(cfg)
    assert loaded.lr == 2e-5 and loaded.warmup_ratio == 0.1
    assert load_yaml("{a: 42, b: 1.5, c: 1e3, d: -.5e-3, e: 2e, f: 1_000, g: e5}") == {
        "a": 42, "b": 1.5, "c": 1000.0, "d": -0.0005, "e": "2e", "f": 1000, "g": "e5"}
    # a mapping given as a flag's YAML value reads the same way
    args = build_parser().parse_args(["retrain", "--config", "r.yaml", "--train", "{lr: 3e-4, epochs: 2}"])
    assert args.train == {"lr": 3e-4, "epochs": 2}



def test_a_number_for_a_text_setting_asks_for_quotes(tmp_path):
    """YAML reads `name: 1e3` as 1000.0 and `name: 2024` as an int: a run would be named "1000.0",
    or a job would fail inside on a number. Either is a one-line error before work; quoted, text."""
    from semvec.train.config import load_train_config

    cfg = tmp_path / "train.yaml"
    for value, shown in (("1e3", "1000.0"), ("2024", "2024")):
        cfg.write_text(f"task: sts\nmethod: full\ntrain: t.jsonl\noutput: o\nname: {value}\n")
        with pytest.raises(ConfigError, match=rf"^name must be text, got {shown}; in YAML, quote it"):
            load_train_config(cfg)
    cfg.write_text("task: sts\nmethod: full\ntrain: t.jsonl\noutput: o\nname: '1e3'\n")
    assert load_train_config(cfg).name == "1e3"
    embed = tmp_path / "embed.yaml"
    embed.write_text("input: in.jsonl\noutput: 2024\n")
    with pytest.raises(ConfigError, match="^output must be text, got 2024"):
        load_embed_config(embed)
    assert load_embed_config(input="in.jsonl", output="o").output == "o"


def test_text_for_a_number_setting_or_a_bad_seed_is_one_line(tmp_path):
    """`dropout: "0.1"` failed inside the config's checks with a TypeError that named no setting;
    `seed: -1` passed the plan and failed in every Ray Train worker, restarted max_failures times."""
    from semvec.train.config import load_train_config

    cfg = tmp_path / "train.yaml"
    base = "task: sts\nmethod: full\ntrain: t.jsonl\noutput: o\n"
    for line, says in (('dropout: "0.1"', "dropout must be a number, got '0.1'; in YAML, write it without "
                                          "quotes: dropout: 0.1"),
                       ("warmup_ratio: '0.1'", "warmup_ratio must be a number"),
                       ("seed: -1", r"seed must be an integer from 0 to 2\*\*32 - 1, got -1"),
                       ("seed: 4294967296", "seed must be an integer from 0")):
        cfg.write_text(base + line + "\n")
        with pytest.raises(ConfigError, match=f"^{says}"):
            load_train_config(cfg)
    embed = tmp_path / "embed.yaml"
    embed.write_text("input: in.jsonl\noutput: o\ncpus_per_worker: '2'\n")
    with pytest.raises(ConfigError, match="^cpus_per_worker must be a number, got '2'"):
        load_embed_config(embed)

def test_pipeline_entry_point_reports_bad_config(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {tmp_path}/missing.jsonl\noutput: {tmp_path}/out\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.backfill", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_training_that_asks_for_more_than_this_machine_has_is_refused_before_ray(tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    base = ["train", "--task", "sts", "--method", "full", "--train", str(tmp_path / "t.jsonl"),
            "--output", str(tmp_path / "out")]
    for extra, message in (([f"--workers={cpus + 1}"], f"{cpus + 1} CPU(s) but this machine has {cpus}"),
                           ([f"--workers={gpus + 1}", "--use-gpu", "--cpus-per-worker=1"],
                            f"{gpus + 1} GPU(s) but this machine has {gpus}")):
        code = main([*base, *extra])
        err = own_lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_old_override_syntax_says_what_replaced_it(capsys):
    for argv in (["embed", "a", "b", "--set", "max_workers=8"], ["train", "--option", "lora_r=16"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = own_lines(capsys.readouterr().err)
        assert done.value.code == 2 and len(err) == 1
        assert "--set max_workers=8 is --max-workers 8, --option lora_r=16 is --lora-r 16" in err[0]


def test_a_mapping_flag_adds_to_the_mapping_in_the_file(tmp_path):
    from semvec.train.config import load_train_config

    cfg = tmp_path / "train.yaml"
    cfg.write_text("task: sts\nmethod: lora\ntrain: t.jsonl\noutput: o\nmethod_options: {lora_r: 4}\n")
    loaded = load_train_config(cfg, method_options={"lora_alpha": 8})
    assert loaded.method_options == {"lora_r": 4, "lora_alpha": 8}


def test_with_json_stdout_holds_the_summary_line_alone(monkeypatch, capsys):
    # Ray prints its workers' and raylets' lines to whatever sys.stdout is when they arrive, during
    # the job and after it (a raylet's "Task ... failed" line once came last on CI); a command that
    # prints as Ray would must leave stdout to the JSON line.
    from semvec import cli

    def a_command_ray_talks_through(args):
        print("(raylet) Task MapWorker(MapBatches(EncodeActor)).submit failed ...")
        return {"rows": 3}

    monkeypatch.setitem(cli.COMMANDS, "register", a_command_ray_talks_through)
    assert main(["register", "m", "--name", "n", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out == '{"rows": 3}\n'
    assert "(raylet) Task" in err
    print("after")  # and stdout is stdout again for whatever runs next
    assert capsys.readouterr().out == "after\n"


def test_training_settings_that_fail_only_in_the_workers_are_refused_before_ray(tmp_path, capsys, tiny_bert,
                                                                                monkeypatch):
    # each of these started Ray (and MLflow) and failed in every worker, trained with them, or
    # ended in an OverflowError; one line now, exit 2, nothing started or written
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)  # an MLflow store would appear here
    sts = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i % 5}
                                               for i in range(20)])
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(20)])
    base = ["train", "--method", "full", "--output", str(tmp_path / "out"), "--model", str(tiny_bert)]
    cases = [
        (["--task", "sts", "--train", str(sts), "--lr", "inf"],
         "lr (--lr) must be a finite number > 0, got inf"),
        (["--task", "sts", "--train", str(sts), "--max-grad-norm", "0"],
         "max_grad_norm (--max-grad-norm) must be a number > 0, got 0.0"),
        (["--task", "sts", "--train", str(sts), "--weight-decay", "-5"],
         "weight_decay (--weight-decay) must be a finite number >= 0"),
        (["--task", "sts", "--train", str(sts), "--max-failures", "-3"],
         "max_failures (--max-failures) must be an integer >= 0, or -1 for no limit"),
        (["--task", "sts", "--train", str(sts), "--max-length", "0"],
         "max_length (--max-length) must be a positive integer"),
        (["--task", "sts", "--train", str(sts), "--replay", str(sts), "--replay-share", "inf"],
         "replay_share (--replay-share) must be a finite number >= 0, got inf"),
        (["--task", "sts", "--train", str(sts), "--symmetric"], "symmetric ranks the anchors"),
        (["--task", "sts", "--train", str(sts), "--freeze-layers", "99"],
         "freeze_layers (--freeze-layers) 99 exceeds the model's 2 layers"),
        (["--task", "sts", "--train", str(sts), "--method", "lora", "--lora-targets", "[nolayer]"],
         "lora_targets (--lora-targets) ['nolayer'] are not linear layers of this bert model"),
        (["--task", "classification", "--train", str(one)],
         "has one label ('x') and the model knows no other; classification needs"),
    ]
    for extra, message in cases:
        code = main([*base, *extra])
        err = own_lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_registry_commands_refuse_before_touching_a_store(tmp_path, capsys, tiny_bert, monkeypatch):
    # rollback created ./mlflow.db to say "no @previous"; register uploaded the model, then MLflow
    # refused the name; a server that does not answer hung for minutes, printing nothing
    import socket
    import time

    from semvec import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = [
        (["rollback", "semvec-sts"], "model 'semvec-sts' is not registered in the registry at"),
        (["register", str(tiny_bert), "--name", "bad name/with slash"],
         "model name 'bad name/with slash' cannot be registered: MLflow takes a name that is not empty "
         "and has no '/' or ':'"),
        (["train", "--task", "sts", "--method", "full", "--train", "t.jsonl", "--output", "o",
          "--register", "a:b"], "model name 'a:b' cannot be registered"),
        (["register", str(tiny_bert), "--name", "o'x"], "(and semvec none with quotes)"),
        # register made the version, then MLflow refused the alias: an orphan version each time
        (["register", str(tiny_bert), "--name", "ok", "--alias", "bad alias/x"],
         "alias 'bad alias/x' cannot be set: MLflow takes 1 to 255 letters, digits"),
        (["register", str(tiny_bert), "--name", "ok", "--alias", "v1"], "and not 'latest' or v<number>"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = own_lines(capsys.readouterr().err)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # no mlflow.db, no mlartifacts
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    tracking._reached.clear()
    t0 = time.monotonic()
    code = main(["rollback", "semvec-sts"])
    err = own_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1, err
    assert (f"the MLflow tracking server at http://127.0.0.1:{port} does not answer "
            "(ConnectionRefusedError") in err[0]
    assert time.monotonic() - t0 < 30


def test_a_pipeline_names_the_flag_beside_the_setting(tmp_path, capsys):
    """`semvec train` said `lora_r (--lora-r) must be ...`; the pipeline said `lora_r must be ...`."""
    from pipelines import finetune
    from pipelines._job import main as pipeline

    config = tmp_path / "ft.yaml"
    config.write_text("task: sts\nmethod: lora\ntrain: t.jsonl\noutput: o\n")
    code = pipeline(finetune.__doc__, finetune.TrainConfig, finetune.finetune,
                    ["--config", str(config), "--lora-r", "0"], extra=finetune.extra_flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "semvec: error: lora_r (--lora-r) must be a positive integer, got 0", err


def test_a_flag_is_taken_whole_only(capsys):
    """`--epoch 2` ran as `--epochs 2`, while a config file's `epoch` is refused."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--task", "sts", "--method", "full", "--train", "t", "--output", "o", "--epoch", "2"])
    assert stopped.value.code == 2 and "unrecognized arguments: --epoch 2" in capsys.readouterr().err
