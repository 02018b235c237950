"""What every job entry point shares: --config FILE, --set KEY=VALUE overrides, exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from semvec.cli import parse_setting
from semvec.errors import ConfigError


def main(doc: str, job: Callable[[argparse.Namespace, dict], dict], argv=None,
         extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, run job(args, overrides), print its summary as JSON; a bad config exits with its code."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        summary = job(args, dict(parse_setting(s) for s in args.set))
    except ConfigError as exc:
        print(f"semvec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary))
    return 0
