"""Embedding backfill, as a Ray job.

Local:    python -m pipelines.backfill --config pipelines/configs/backfill.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.backfill --config ...
Settings can be overridden: --set output=s3://bucket/run1 --set max_workers=8
"""

import argparse
import json
import sys

import yaml

from semvec.backfill.job import print_summary, run
from semvec.config import load_embed_config
from semvec.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        overrides = dict(_parse_setting(s) for s in args.set)
        config = load_embed_config(args.config, **overrides)
        summary = run(config)
    except ConfigError as exc:
        print(f"semvec: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    print(json.dumps(summary))
    return 0


def _parse_setting(text: str):
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)  # YAML typing: 8 -> int, true -> bool


if __name__ == "__main__":
    sys.exit(main())
