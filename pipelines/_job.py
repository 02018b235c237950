"""What every job entry point shares: --config FILE, the config's own flags as overrides (the same
flags as the `semvec` command's), exit codes.

Errors end as the CLI's do: one redacted line on stderr (a redacted traceback with -v), exit code
2 for a bad config (3: the output's lease or the retrain lock is held), 1 for any other failure,
130 for an interrupt.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from semvec.cli import ArgumentParser, add_verbose, run_guarded, setting_flags
from semvec.options import add_config_flags, given
from semvec.redact import redact, setup_logging


def build_parser(doc: str, config_cls: type,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> tuple[argparse.ArgumentParser, list[str]]:
    """The entry point's parser, and the config fields that have a flag."""
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the job's settings (required)")
    fields = add_config_flags(parser, config_cls)
    add_verbose(parser)
    if extra:
        extra(parser)
    return parser, fields


def main(doc: str, config_cls: type, job: Callable[[argparse.Namespace, dict], dict], argv=None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, run job(args, overrides), print its summary as JSON; return the exit code."""
    parser, fields = build_parser(doc, config_cls, extra)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    code, summary = run_guarded(lambda: job(args, given(args, fields)), args.verbose, setting_flags(parser))
    if code == 0:
        print(redact(json.dumps(summary)))
    return code
