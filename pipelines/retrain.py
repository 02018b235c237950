"""Scheduled retraining, as a Ray job: challenger from new data, promoted only when it wins.

Local:    python -m pipelines.retrain --config pipelines/configs/retrain.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.retrain --config ...
Settings can be overridden: --set state=s3://bucket/retrain --set 'snapshots=[s3://bucket/new/]'
Exit codes: 0 done (promoted, refused or nothing new), 2 bad config, 3 another run holds the lock.
"""

import argparse
import json
import sys

from semvec.cli import parse_setting
from semvec.errors import ConfigError
from semvec.retrain.config import load_retrain_config
from semvec.retrain.job import retrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        summary = retrain(load_retrain_config(args.config, **dict(parse_setting(s) for s in args.set)))
    except ConfigError as exc:
        print(f"semvec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
