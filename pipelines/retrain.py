"""Scheduled retraining, as a Ray job: challenger from new data, promoted only when it wins.

Local:    python -m pipelines.retrain --config pipelines/configs/retrain.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.retrain --config ...
Every setting of the config has a flag that overrides it: --state s3://bucket/retrain --snapshots '[s3://bucket/new/]'
Exit codes: 0 done (promoted, refused or nothing new), 2 bad config, 3 another run holds the lock.
"""

import sys

from pipelines._job import main
from semvec.retrain.config import RetrainConfig, load_retrain_config
from semvec.retrain.job import retrain


def run(args, overrides: dict) -> dict:
    return retrain(load_retrain_config(args.config, **overrides))


if __name__ == "__main__":
    sys.exit(main(__doc__, RetrainConfig, run))
