"""`semvec ...`: parse, load the config, call one function, print a summary.

Every error is one redacted line on stderr, no traceback (`-v` adds a redacted one): bad
arguments exit with code 2 before any Ray work starts (3: another retrain holds the lock), any
other failure with 1, an interrupt with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from semvec.config import DType, Granularity, InputFormat, Pooling
from semvec.errors import ConfigError
from semvec.redact import redact, setup_logging

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (the usage itself is behind --help)."""

    def error(self, message: str):
        self.exit(2, f"semvec: error: {redact(message)} (see {self.prog} --help)\n")


def _choices(enum) -> list[str]:
    return [e.value for e in enum]


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed a corpus into parquet files (a Ray Data backfill)")
    p.add_argument("input", nargs="?", help="file, folder or glob; local or s3://")
    p.add_argument("output", nargs="?", help="output prefix; local or s3://")
    p.add_argument("--config", help="YAML file with the same settings (flags override it)")
    p.add_argument("--model", help="bundled (default), a local dir, s3://..., models:/...")
    p.add_argument("--text-field", dest="text_field")
    p.add_argument("--id-field", dest="id_field", help="default: ids are FILE:ROW")
    p.add_argument("--format", dest="input_format", choices=_choices(InputFormat))
    p.add_argument("--pooling", help=f"one of {', '.join(_choices(Pooling))}")
    p.add_argument("--normalize", dest="normalize", action="store_true", default=None)
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--granularity", help=f"one of {', '.join(_choices(Granularity))}")
    p.add_argument("--dtype", help=f"one of {', '.join(_choices(DType))}")
    p.add_argument("--max-chars", dest="max_chars", type=int)
    p.add_argument("--batch-tokens", dest="batch_tokens", type=int)
    p.add_argument("--batch-rows", dest="batch_rows", type=int)
    p.add_argument("--rows-per-file", dest="rows_per_file", type=int)
    p.add_argument("--min-workers", dest="min_workers", type=int)
    p.add_argument("--max-workers", dest="max_workers", type=int)
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float)
    p.add_argument("--num-gpus-per-worker", dest="num_gpus_per_worker", type=float)
    p.add_argument("--threads-per-worker", dest="threads_per_worker", type=int)
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true", default=None)
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--max-failed-share", dest="max_failed_share", type=float,
                   help="stop with exit 1 above this share of encode_failed rows (default 0.05)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model or stored vectors")
    tasks = p.add_subparsers(dest="task", required=True)
    sts = tasks.add_parser("sts", help="Spearman of cosine similarity vs gold scores")
    sts.add_argument("--data", required=True, help="pairs: sentence1, sentence2, score")
    ret = tasks.add_parser("retrieval", help="BEIR-format retrieval: nDCG@10, MRR@10, Recall@100")
    ret.add_argument("--corpus", required=True)
    ret.add_argument("--queries", required=True)
    ret.add_argument("--qrels", required=True)
    ret.add_argument("--query-vectors", help="backfill output with the queries' vectors (by _id)")
    for task in ("classification", "ner"):
        t = tasks.add_parser(task, help=f"score a model trained by `semvec train --task {task}`")
        t.add_argument("--model", required=True)
        t.add_argument("--data", required=True)
        t.add_argument("--json", action="store_true")
    for t in (sts, ret):
        src = t.add_mutually_exclusive_group()
        src.add_argument("--model", help="model reference (default: bundled)")
        src.add_argument("--vectors", help="a backfill output prefix; vectors are looked up by id")
        t.add_argument("--json", action="store_true")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune on Ray Train, tracked in MLflow")
    p.add_argument("--config", help="YAML file with the same settings (flags override it)")
    p.add_argument("--task", help="sts | pairs | classification | ner")
    p.add_argument("--method", help="full | lora | prompt | adapter | bitfit")
    p.add_argument("--train", help="training data: jsonl/csv/tsv/parquet or CoNLL, local or s3://")
    p.add_argument("--dev", help="dev data for choosing (default: a seeded 10%% of train)")
    p.add_argument("--output", help="where the model directory goes")
    p.add_argument("--model", help="base model reference (default: bundled)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--loss", help="sts: cosent | cosine_mse; pairs: mnrl")
    p.add_argument("--symmetric", action="store_true", default=None)
    p.add_argument("--optimizer", help="adamw | sgd")
    p.add_argument("--schedule", help="linear | cosine | constant")
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--eval-steps", dest="eval_steps", type=int,
                   help="also evaluate and checkpoint every N steps (default: each epoch end)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=int)
    p.add_argument("--replay", help="continual learning: past training data of this task to mix in")
    p.add_argument("--replay-share", dest="replay_share", type=float,
                   help="replay examples as a share of the new ones (default 0.5)")
    p.add_argument("--l2sp", type=float, help="weight of the pull toward the starting weights")
    p.add_argument("--ewc", type=float, help="weight of EWC (Fisher on the replay data)")
    p.add_argument("--distill", type=float,
                   help="weight of distillation to the starting model on replay text")
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--name", help="run name; rerunning a name resumes it")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. lora_r=16, freeze_layers=2")
    p.add_argument("--register", help="register the model under this name in MLflow")
    p.add_argument("--experiment", default="semvec")
    p.add_argument("--json", action="store_true")


def _retrain_parsers(sub) -> None:
    p = sub.add_parser("retrain", help="train a challenger on new data; promote it only if it wins")
    p.add_argument("--config", required=True, help="YAML retraining config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("rollback", help="restore @previous as @champion")
    p.add_argument("name", help="registered model name")
    p.add_argument("--backfill-root", dest="backfill_root",
                   help="also point CURRENT under this prefix back at that version's backfill")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("register", help="register a model directory (any model reference) in MLflow")
    p.add_argument("model", help="bundled, a local dir, s3://..., models:/...")
    p.add_argument("--name", required=True)
    p.add_argument("--alias", help="e.g. champion")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="semvec", description=__doc__.splitlines()[0])
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _embed_parser(sub)
    _evaluate_parser(sub)
    _train_parser(sub)
    _retrain_parsers(sub)
    return parser


def _embed(args) -> dict:
    from semvec.backfill.job import print_summary, run
    from semvec.config import load_embed_config

    skip = {"command", "config", "json", "verbose"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    config = load_embed_config(args.config, **overrides)
    summary = run(config)
    if not args.json:
        print_summary(summary)
    return summary


def _evaluate(args) -> dict:
    from semvec import evaluate

    if args.task in ("classification", "ner"):
        from semvec.train.data import Task
        from semvec.train.predict import evaluate_task

        result = evaluate_task(args.model, args.data, Task(args.task))
        report = result.pop("report", None)
    elif args.task == "sts":
        embed = (evaluate.vector_embedder(args.vectors) if args.vectors
                 else evaluate.model_embedder(args.model or "bundled"))
        result = evaluate.evaluate_sts(embed, args.data)
    else:
        if args.vectors:
            docs = evaluate.vector_embedder(args.vectors)
            queries = evaluate.vector_embedder(args.query_vectors or args.vectors)
            by_id = True
        else:
            docs = queries = evaluate.model_embedder(args.model or "bundled")
            by_id = False
        result = evaluate.evaluate_retrieval(docs, queries, args.corpus, args.queries,
                                             args.qrels, by_id=by_id)
    if args.task in ("classification", "ner") and report and not args.json:
        print(report)
    if not args.json:
        print(f"semvec evaluate {args.task}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def _train(args) -> dict:
    import yaml

    from semvec.train.config import load_train_config
    from semvec.train.job import fit

    options = {}
    for item in args.option:
        if "=" not in item:
            raise ConfigError(f"--option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    skip = {"command", "config", "json", "verbose", "option", "register", "experiment"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    if options:
        overrides["method_options"] = options
    config = load_train_config(args.config, **overrides)
    summary = fit(config, register=args.register, experiment=args.experiment)
    if not args.json:
        print(f"semvec train: {config.task.value}/{config.method.value} -> {summary['output']}; best "
              + ", ".join(f"{k} {v:.4f}" for k, v in summary["best"].items() if isinstance(v, float))
              + f"; trainable parameters {summary['trainable_parameters']:,} of "
              f"{summary['total_parameters']:,}; MLflow run {summary['run_id']}"
              + (f"; registered version {summary['registered_version']}"
                 if summary["registered_version"] else ""))
    return summary


def _retrain(args) -> dict:
    from semvec.retrain.config import load_retrain_config
    from semvec.retrain.job import retrain

    summary = retrain(load_retrain_config(args.config, **dict(parse_setting(s) for s in args.set)))
    if not args.json:
        print(f"semvec retrain: {summary['decision']}"
              + (f" ({summary['message']})" if "message" in summary else "")
              + (f"; challenger v{summary['challenger_version']}" if "challenger_version" in summary else "")
              + (f"; backfill {summary['backfill']['output']}" if "backfill" in summary else ""))
    return summary


def _rollback(args) -> dict:
    from semvec.retrain.job import rollback

    result = rollback(args.name, args.backfill_root)
    if not args.json:
        print(f"semvec rollback: {args.name}@champion is v{result['champion_version']} again"
              + (f"; CURRENT -> {result['current']}" if result["current"] else ""))
    return result


def _register(args) -> dict:
    from semvec import tracking

    version = tracking.register_model(args.model, args.name, args.alias)
    if not args.json:
        print(f"semvec register: {args.name} v{version}" + (f" @{args.alias}" if args.alias else ""))
    return {"name": args.name, "version": version, "alias": args.alias}


def parse_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE with YAML typing (8 -> int, true -> bool, [a, b] -> list)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


COMMANDS = {"embed": _embed, "evaluate": _evaluate, "train": _train, "retrain": _retrain,
            "rollback": _rollback, "register": _register}


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on an error also print the (redacted) traceback; log debug lines "
                             "and MLflow's info lines")


def error_line(exc: BaseException) -> str:
    """The one line an error ends a command with, redacted: a ConfigError's message (it names the
    bad value), else the exception's type and the first line of its message."""
    if isinstance(exc, KeyboardInterrupt):
        return "semvec: interrupted"
    text = redact(str(exc)).strip()
    if isinstance(exc, ConfigError):
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    else:
        first = text.splitlines()[0] if text else ""
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"semvec: error: {text}"


def run_guarded(call: Callable[[], T], verbose: bool) -> tuple[int, T | None]:
    """(0, call()), or (exit code, None) after one redacted line on stderr: a ConfigError's code
    (2, or 3 for a held lock), else the exception's exit_code or 1, 130 for an interrupt."""
    try:
        return 0, call()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure ends in one line
        if verbose:
            print(redact(traceback.format_exc()).rstrip(), file=sys.stderr)
        print(error_line(exc), file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            return 130, None
        code = getattr(exc, "exit_code", 1)
        return (code if isinstance(code, int) and code > 0 else 1), None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    code, result = run_guarded(lambda: COMMANDS[args.command](args), args.verbose)
    if code == 0 and getattr(args, "json", False):
        print(redact(json.dumps(result)))
    return code


if __name__ == "__main__":
    sys.exit(main())
