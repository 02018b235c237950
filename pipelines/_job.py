"""What every job entry point shares: --config FILE, --set KEY=VALUE overrides, exit codes.

Errors end as the CLI's do: one redacted line on stderr (a redacted traceback with -v), exit code
2 for a bad config (3: the retrain lock is held), 1 for any other failure, 130 for an interrupt.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from semvec.cli import ArgumentParser, add_verbose, parse_setting, run_guarded
from semvec.redact import redact, setup_logging


def main(doc: str, job: Callable[[argparse.Namespace, dict], dict], argv=None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, run job(args, overrides), print its summary as JSON; return the exit code."""
    parser = ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_verbose(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    code, summary = run_guarded(lambda: job(args, dict(parse_setting(s) for s in args.set)),
                                args.verbose)
    if code == 0:
        print(redact(json.dumps(summary)))
    return code
