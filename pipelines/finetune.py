"""Fine-tuning, as a Ray job.

Local:    python -m pipelines.finetune --config pipelines/configs/finetune.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.finetune --config ...
Settings can be overridden: --set workers=4 --set use_gpu=true --register NAME
"""

import argparse
import json
import sys

from semvec.cli import parse_setting
from semvec.errors import ConfigError
from semvec.train.config import load_train_config
from semvec.train.job import fit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--register")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, **dict(parse_setting(s) for s in args.set))
        summary = fit(config, register=args.register)
    except ConfigError as exc:
        print(f"semvec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
