"""Embedding backfill, as a Ray job.

Local:    python -m pipelines.backfill --config pipelines/configs/backfill.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.backfill --config ...
Settings can be overridden: --set output=s3://bucket/run1 --set max_workers=8
"""

import argparse
import json
import sys

from semvec.backfill.job import print_summary, run
from semvec.cli import parse_setting
from semvec.config import load_embed_config
from semvec.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_setting(s) for s in args.set)
        config = load_embed_config(args.config, **overrides)
        summary = run(config)
    except ConfigError as exc:
        print(f"semvec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print_summary(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
