"""The `semvec` command: one subcommand per job, each a thin layer over the library.

Every error is one redacted line on stderr, no traceback (`-v` adds a redacted one): bad
arguments, and a login the MLflow server refuses (401) or a request it does not permit (403), exit
with code 2, bad arguments before any Ray work starts (3: another run holds the output's lease or
the retraining lock), any other failure with 1, an interrupt with 130. The flags of embed, train
and retrain are generated from their configs (semvec.options), as the pipelines' are.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from semvec.errors import ConfigError
from semvec.redact import redact, setup_logging

T = TypeVar("T")

DESCRIPTION = """semvec: semantic vectors from language models, at cluster scale.
Embed corpora on Ray Data (sentence or token vectors, resumable, every row exactly once), score
models and vectors, fine-tune on Ray Train with MLflow tracking, and retrain on a schedule with a
champion/challenger registry. Run `semvec COMMAND --help` for a command's settings."""


CONFIG_HELP = "YAML file with the same settings; flags override it (default: flags only)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (the usage itself is behind --help), and that
    takes a flag whole only: `--epoch` is not `--epochs` (a config file's `epoch` is refused too,
    and a flag added later cannot change what a script's abbreviation meant)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = ""
        if "--set" in message or "--option" in message:  # the override syntax of semvec 0.1
            hint = "; settings are flags of their own now: --set max_workers=8 is --max-workers 8, " \
                   "--option lora_r=16 is --lora-r 16"
        self.exit(2, f"semvec: error: {redact(message)}{hint} (see {self.prog} --help)\n")


def _embed_parser(sub) -> None:
    from semvec.config import EmbedConfig
    from semvec.options import add_config_flags

    p = sub.add_parser("embed", help="embed a corpus into parquet files (a Ray Data backfill)",
                       description="Embed a corpus into parquet files under an output prefix, with a "
                                   "manifest and a quarantine for rows that cannot be embedded.")
    p.add_argument("input", nargs="?", help=EmbedConfig.HELP["input"])
    p.add_argument("output", nargs="?", help=EmbedConfig.HELP["output"])
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(config_fields=add_config_flags(p, EmbedConfig, skip=("input", "output")))
    _json_flag(p)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model or stored vectors",
                       description="Score a model, or vectors a backfill wrote, on labelled data.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="KIND")
    sts = tasks.add_parser("sts", help="Spearman of cosine similarity vs gold scores")
    sts.add_argument("--data", required=True,
                     help="pairs: sentence1, sentence2, score (jsonl/csv/tsv/parquet, the STS-B and "
                          "CNSD releases), local or s3:// (required)")
    ret = tasks.add_parser("retrieval", help="BEIR-format retrieval: nDCG@10, MRR@10, Recall@100")
    ret.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text) (required)")
    ret.add_argument("--queries", required=True, help="BEIR queries.jsonl (_id, text) (required)")
    ret.add_argument("--qrels", required=True,
                     help="BEIR qrels .tsv (query-id, corpus-id, score) (required)")
    ret.add_argument("--query-vectors", dest="query_vectors",
                     help="backfill output with the queries' vectors by _id (default: --vectors)")
    ret.add_argument("--index", help="an index built by `semvec index` over the corpus's vectors, "
                                     "searched as it serves; queries embedded by its model (default: "
                                     "exact search over --vectors or --model)")
    for task in ("classification", "ner"):
        t = tasks.add_parser(task, help=f"score a model trained by `semvec train --task {task}`")
        t.add_argument("--model", required=True,
                       help="a model reference written by semvec train (required)")
        t.add_argument("--data", required=True,
                       help=f"labelled {task} data, any layout train reads (required)")
    for t in (sts, ret):
        src = t.add_mutually_exclusive_group()
        src.add_argument("--model", help="model reference (default: bundled)")
        src.add_argument("--vectors", help="a backfill output prefix; vectors are looked up by id "
                                           "(embed with --id-field text for STS, _id for BEIR) "
                                           "(default: embed with --model)")
    for t in (sts, ret, *[tasks.choices[k] for k in ("classification", "ner")]):
        t.add_argument("--report", help="also write the result as JSON to this path, local or s3:// "
                                        "(default: print only)")
        _json_flag(t)


def _train_parser(sub) -> None:
    from semvec.options import add_config_flags
    from semvec.train.config import MethodConfig, TrainConfig

    p = sub.add_parser("train", help="fine-tune on Ray Train, tracked in MLflow",
                       description="Fine-tune a model on labelled data with Ray Train; the best "
                                   "checkpoint on dev is exported and logged to MLflow.")
    p.add_argument("--config", help=CONFIG_HELP)
    fields = add_config_flags(p, TrainConfig, skip=("method_options",))
    p.set_defaults(config_fields=fields,
                   method_fields=add_config_flags(p, MethodConfig, title="method options"))
    p.add_argument("--register", help="register the model under this name in the MLflow registry "
                                      "(default: log only)")
    p.add_argument("--experiment", default="semvec", help="MLflow experiment (default: semvec)")
    _json_flag(p)


def _retrain_parsers(sub) -> None:
    from semvec.options import add_config_flags
    from semvec.retrain.config import RetrainConfig

    p = sub.add_parser("retrain", help="train a challenger on new data; promote it only if it wins",
                       description="One retraining round: challenger from new data, scored against "
                                   "the champion, promoted only when it wins, then a backfill.")
    p.add_argument("--config", required=True, help="YAML retraining config; flags override it (required)")
    p.set_defaults(config_fields=add_config_flags(p, RetrainConfig))
    _json_flag(p)
    p = sub.add_parser("rollback", help="restore @previous as @champion")
    p.add_argument("name", help="registered model name")
    p.add_argument("--backfill-root", dest="backfill_root",
                   help="also point CURRENT under this prefix back at that version's backfill "
                        "(default: aliases only)")
    _json_flag(p)
    p = sub.add_parser("register", help="register a model directory (any model reference) in MLflow")
    p.add_argument("model", help="bundled, a local dir, s3://..., models:/...")
    p.add_argument("--name", required=True, help="registered model name (required)")
    p.add_argument("--alias", help="also point this alias at the new version, e.g. champion (default: none)")
    _json_flag(p)


def _compress_parser(sub) -> None:
    from semvec.compress.config import CompressConfig
    from semvec.options import add_config_flags

    p = sub.add_parser("compress", help="compress a backfill's vectors: PCA, int8 or binary",
                       description="Compress the float vectors of a complete backfill output: PCA "
                                   "fitted on a seeded sample (the projection is saved and applied "
                                   "to queries), int8 scalar quantisation, or sign bits; one part "
                                   "per source part, with a manifest and the source's lineage.")
    p.add_argument("vectors", nargs="?", help=CompressConfig.HELP["vectors"])
    p.add_argument("output", nargs="?", help=CompressConfig.HELP["output"])
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(config_fields=add_config_flags(p, CompressConfig, skip=("vectors", "output")))
    _json_flag(p)


def _distill_parser(sub) -> None:
    from semvec.distill import DistillConfig
    from semvec.options import add_config_flags

    p = sub.add_parser("distill", help="make a static model from an encoder: no transformer at run time",
                       description="Distil a static model from an encoder, as model2vec does: every "
                                   "vocabulary token through the model, PCA, Zipf-rank weights. "
                                   "`semvec embed --model DIR` runs it with no transformer, and "
                                   "sentence-transformers loads it (StaticEmbedding).")
    p.set_defaults(config_fields=add_config_flags(p, DistillConfig))
    _json_flag(p)


def _words_parser(sub) -> None:
    from semvec.options import add_config_flags
    from semvec.words import WordsConfig

    p = sub.add_parser("words", help="one vector per word of a word list (word2vec text or parquet)",
                       description="One vector per whole word of a word list, from a model or a "
                                   "static model: word2vec text (gensim's load_word2vec_format) "
                                   "or parquet.")
    p.set_defaults(config_fields=add_config_flags(p, WordsConfig))
    _json_flag(p)


def _index_parser(sub) -> None:
    from semvec.options import add_config_flags
    from semvec.search.config import IndexConfig

    p = sub.add_parser("index", help="build a search index (FAISS) from a backfill's vectors",
                       description="Build a FAISS index (exact, hnsw or ivf) from a complete backfill "
                                   "output, local or s3://; it records the model, so `semvec "
                                   "search` embeds queries with the same one.")
    p.add_argument("vectors", nargs="?", help=IndexConfig.HELP["vectors"])
    p.add_argument("index", nargs="?", help=IndexConfig.HELP["index"])
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(config_fields=add_config_flags(p, IndexConfig, skip=("vectors", "index")))
    _json_flag(p)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="search an index with a query, or a file of queries",
                       description="Embed queries with the index's model and return the k nearest "
                                   "ids with their cosine scores.")
    p.add_argument("index", help="an index prefix written by `semvec index`, local or s3://")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", action="append",
                      help="a query text (repeat for several); answers print as JSON lines "
                           "(required: this or --queries)")
    what.add_argument("--queries", help="a file, folder or glob of queries, read as `semvec embed` "
                                        "reads a corpus; answers go to --output (required: this or "
                                        "--query)")
    p.add_argument("--output", help="with --queries: jsonl output, one line per query row, local or "
                                    "s3:// (required with --queries)")
    p.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--text-field", dest="text_field", default="text",
                   help="with --queries: the field holding the text (default: text)")
    p.add_argument("--id-field", dest="id_field",
                   help="with --queries: the field holding a query's id (default: FILE:ROW)")
    p.add_argument("--model", help="embed queries with this reference; it must be the index's model "
                                   "(same fingerprint), found elsewhere (default: the index's record)")
    p.add_argument("--ef-search", dest="ef_search", type=int,
                   help="hnsw: candidates per query (default: the index's)")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default: the index's)")
    _json_flag(p)


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="a 2-D map (PNG) of a sample of stored vectors",
                       description="Draw a seeded sample of a backfill's vectors in 2-D (PCA, or UMAP "
                                   "when installed), coloured by a field.")
    p.add_argument("vectors", help="a complete backfill output prefix, local or s3://")
    p.add_argument("--output", required=True, help="the PNG to write, local or s3:// (required)")
    p.add_argument("--color-by", dest="color_by",
                   help="colour by this column of the vectors (source, truncated, ...) or, with "
                        "--labels, this field of the labels file (default: one colour)")
    p.add_argument("--labels", help="a table with the --color-by field (string values), read as "
                                    "`semvec embed` reads input (default: the vectors' columns)")
    p.add_argument("--id-field", dest="id_field",
                   help="the labels file's id field (default: FILE:ROW, as `semvec embed` names rows "
                        "without --id-field)")
    p.add_argument("--sample", type=int, default=5_000, help="points drawn, seeded (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default: 0)")
    p.add_argument("--method", default="pca", help="pca, or umap with umap-learn installed (default: pca)")
    p.add_argument("--max-colors", dest="max_colors", type=int, default=20,
                   help="the most frequent values get a colour, the rest are grey (default: 20)")
    p.add_argument("--title", help="title of the map (default: the vectors, the sample, the method)")
    _json_flag(p)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def build_parser() -> argparse.ArgumentParser:
    from semvec import __version__

    parser = ArgumentParser(prog="semvec", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"semvec {__version__}")
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _embed_parser(sub)
    _compress_parser(sub)
    _evaluate_parser(sub)
    _train_parser(sub)
    _retrain_parsers(sub)
    _distill_parser(sub)
    _words_parser(sub)
    _index_parser(sub)
    _search_parser(sub)
    _plot_parser(sub)
    return parser


def _embed(args) -> dict:
    from semvec.backfill.job import print_summary, run
    from semvec.config import load_embed_config
    from semvec.options import given

    overrides = {"input": args.input, "output": args.output, **given(args, args.config_fields)}
    config = load_embed_config(args.config, **overrides)
    summary = run(config)
    if not args.json:
        print_summary(summary)
    return summary


def _compress(args) -> dict:
    from semvec.compress.config import load_compress_config
    from semvec.compress.job import print_summary, run
    from semvec.options import given

    overrides = {"vectors": args.vectors, "output": args.output, **given(args, args.config_fields)}
    summary = run(load_compress_config(args.config, **overrides))
    if not args.json:
        print_summary(summary)
    return summary


def _evaluate(args) -> dict:
    from semvec import evaluate, storage

    given = {k: getattr(args, k, None) for k in ("model", "vectors", "query_vectors", "data", "corpus",
                                                  "queries", "qrels", "index")}
    if args.report:
        storage.check_file_writable(args.report, "report")
    result = evaluate.evaluate(args.task, **given)
    if args.report:
        evaluate.write_report({"kind": args.task, **result}, args.report)
    report = result.pop("report", None)
    if report and not args.json:
        print(report)
    for detail in ("per_label", "confusion"):  # in --report's JSON; too long for a summary line
        result.pop(detail, None)
    if not args.json:
        print(f"semvec evaluate {args.task}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def _train(args) -> dict:
    from semvec.options import given
    from semvec.train.config import load_train_config
    from semvec.train.job import fit

    overrides = given(args, args.config_fields)
    options = given(args, args.method_fields)
    if options:  # added to the config file's method options (load_settings merges mappings)
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
    from semvec.options import given
    from semvec.retrain.config import load_retrain_config
    from semvec.retrain.job import retrain

    summary = retrain(load_retrain_config(args.config, **given(args, args.config_fields)))
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
    from semvec import models

    version = models.register_model(args.model, args.name, args.alias)
    if not args.json:
        print(f"semvec register: {args.name} v{version}" + (f" @{args.alias}" if args.alias else ""))
    return {"name": args.name, "version": version, "alias": args.alias}


def _distill(args) -> dict:
    from semvec.distill import distill, load_distill_config
    from semvec.options import given

    summary = distill(load_distill_config(**given(args, args.config_fields)))
    if not args.json:
        print(f"semvec distill: {summary['base_model']} -> a static model of {summary['vocabulary']:,} "
              f"tokens x {summary['dims']} dims in {summary['seconds']} s; output {summary['output']}")
    return summary


def _words(args) -> dict:
    from semvec.options import given
    from semvec.words import export_words, load_words_config

    s = export_words(load_words_config(**given(args, args.config_fields)))
    if not args.json:
        print(f"semvec words: {s['words']:,} words x {s['dim']} dims ({s['kind']} model, {s['format']}) "
              f"in {s['seconds']} s; {s['blank_lines']} blank line(s) skipped, {s['duplicates']} "
              f"repeated line(s) kept once, {s['unknown']} word(s) only unknown pieces, "
              f"{s['no_pieces']} with no piece; output {s['output']}")
    return s


def _index(args) -> dict:
    from semvec.options import given
    from semvec.search.build import build, print_summary
    from semvec.search.config import load_index_config

    overrides = {"vectors": args.vectors, "index": args.index, **given(args, args.config_fields)}
    summary = build(load_index_config(args.config, **overrides))
    if not args.json:
        print_summary(summary)
    return summary


def _search(args) -> dict:
    from semvec.search import open_index
    from semvec.search.batch import check_output, search_file

    if args.queries and not args.output:
        raise ConfigError("--queries needs --output, the jsonl file the answers go to")
    if args.output and not args.queries:
        raise ConfigError("--output goes with --queries; --query answers print to stdout")
    if args.k < 1:
        raise ConfigError(f"-k must be an integer >= 1, got {args.k}")
    if args.query and (args.id_field or args.text_field != "text"):
        raise ConfigError("--text-field and --id-field read a --queries file; --query is the text itself")
    if args.queries:
        check_output(args.queries, args.output)
    opened = open_index(args.index)
    tuning = {"ef_search": args.ef_search, "nprobe": args.nprobe}
    opened.check_tuning(args.k, **tuning)  # before a model loads or a query is read
    if args.queries:
        summary = search_file(opened, args.queries, args.output, args.k, args.text_field,
                              args.id_field, args.model, **tuning)
        if not args.json:
            print(f"semvec search: {summary['answered']} of {summary['queries']} queries answered "
                  f"({summary['errors']} rows with an error line), top {args.k}, in "
                  f"{summary['seconds']} s; output {summary['output']}")
        return summary
    hits = opened.search(args.query, args.k, model=args.model, **tuning)
    answers = [{**h.to_dict(), "query": q} for q, h in zip(args.query, hits, strict=True)]
    if not args.json:
        for answer in answers:
            print(json.dumps(answer, ensure_ascii=False))
    return {"answers": answers}


def _plot(args) -> dict:
    from semvec.plot import PlotSettings, plot

    summary = plot(PlotSettings(args.vectors, args.output, args.color_by, args.labels, args.sample,
                                args.seed, args.method, args.max_colors, args.title, args.id_field))
    if not args.json:
        print(f"semvec plot: {summary['points']:,} of {summary['of']:,} vectors by {summary['method']}"
              + (f", {summary['values']} values of {summary['color_by']}" if summary["color_by"] else "")
              + f"; output {summary['output']}")
    return summary


COMMANDS = {"embed": _embed, "evaluate": _evaluate, "train": _train, "retrain": _retrain,
            "rollback": _rollback, "register": _register, "compress": _compress,
            "distill": _distill, "words": _words, "index": _index, "search": _search,
            "plot": _plot}


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on an error also print the (redacted) traceback; log debug lines "
                             "and MLflow's info lines")


def error_line(exc: BaseException, flags: dict[str, str] | None = None) -> str:
    """The one line an error ends a command with, redacted: a ConfigError's message (it names the
    bad value), else the exception's type and the first line of its message. A setting the
    message names (`batch_rows`) gets the command's flag for it beside it (`flags`, from
    setting_flags)."""
    if isinstance(exc, KeyboardInterrupt):
        return "semvec: interrupted"
    text = redact(str(exc)).strip()
    if isinstance(exc, ConfigError):
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        text = with_flags(text, flags or {})
    else:
        first = text.splitlines()[0] if text else ""
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"semvec: error: {text}"


def setting_flags(parser: argparse.ArgumentParser, command: str | None = None) -> dict[str, str]:
    """The settings of a command (a subcommand of parser, or parser itself: a pipeline's) -> the
    flag that sets each (`batch_rows` -> `--batch-rows`), as its errors name them."""
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    return {a.dest: a.option_strings[0] for a in parser._actions
            if a.option_strings and a.option_strings[0].startswith("--")}


def with_flags(text: str, flags: dict[str, str]) -> str:
    """An error's text with the flag beside the setting it names: `batch_rows` anywhere (a name
    with an underscore is no English word), a plain name only where it is the subject (`epochs
    must be ...`, `setting 'train'`, `set replay` at the end). A list of allowed settings (a config
    file's keys) and a text naming the flag already are left as they are."""
    head, sep, tail = text.partition("; allowed: ")
    if head.startswith("unknown setting"):
        return text
    for name, flag in flags.items():
        if flag in head:
            continue
        if "_" in name:  # outside quotes: a quoted value (a path, a column) is the user's data
            pieces = re.split(r"('[^']*')", head)
            for i in range(0, len(pieces), 2):
                pieces[i], n = re.subn(rf"(?<![\w-]){name}(?![\w=-])", f"{name} ({flag})", pieces[i],
                                       count=1)
                if n:
                    break
            head = "".join(pieces)
        head = re.sub(rf"^{name} must ", f"{name} ({flag}) must ", head)
        head = re.sub(rf"\bset {name}$", f"set {name} ({flag})", head)
        head = head.replace(f"setting '{name}'", f"setting '{name}' ({flag})")
    return head + sep + tail


def run_guarded(call: Callable[[], T], verbose: bool,
                flags: dict[str, str] | None = None) -> tuple[int, T | None]:
    """(0, call()), or (exit code, None) after one redacted line on stderr: a ConfigError's code
    (2, or 3 for a held lock), else the exception's exit_code or 1, 130 for an interrupt. `flags`:
    see error_line."""
    had_ray = _ray_is_up()
    try:
        return 0, call()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure ends in one line
        exc = _refused_login(exc) or exc
        if verbose:
            print(redact(traceback.format_exc()).rstrip(), file=sys.stderr)
        # A Ray this call started forwards its processes' lines (a GCS complaining about actors it
        # can no longer kill, ...) until it is shut down: shut it first, so ours is the last line.
        if _ray_is_up() and not had_ray:
            _shutdown_ray()
        print(error_line(exc, flags), file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            return 130, None
        code = getattr(exc, "exit_code", 1)
        return (code if isinstance(code, int) and code > 0 else 1), None


def _refused_login(exc: BaseException) -> ConfigError | None:
    """The MLflow server's 401 or 403 as a ConfigError (exit 2) that says which, else None."""
    if isinstance(exc, ConfigError):
        return None
    from semvec.tracking import refusal

    return refusal(exc)


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    try:
        sys.modules["ray"].shutdown()
    except Exception:  # noqa: BLE001 - the command's own outcome is what the user must see
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    flags = setting_flags(parser, args.command)
    if not getattr(args, "json", False):
        return run_guarded(lambda: COMMANDS[args.command](args), args.verbose, flags)[0]
    # stdout holds the JSON line alone. Ray forwards its workers' and raylets' lines to whatever
    # sys.stdout is when they arrive, until it shuts down: they go to stderr meanwhile.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        had_ray = _ray_is_up()
        code, result = run_guarded(lambda: COMMANDS[args.command](args), args.verbose, flags)
        if _ray_is_up() and not had_ray:  # this command's Ray: done with it
            _shutdown_ray()
    finally:
        sys.stdout = out
    if code == 0:
        print(redact(json.dumps(result)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
