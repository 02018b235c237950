"""Embedding backfill, as a Ray job.

Local:    python -m pipelines.backfill --config pipelines/configs/backfill.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.backfill --config ...
Every setting of the config has a flag that overrides it: --output s3://bucket/run1 --max-workers 8
"""

import sys

from pipelines._job import main
from semvec.backfill.job import print_summary, run
from semvec.config import EmbedConfig, load_embed_config


def backfill(args, overrides: dict) -> dict:
    summary = run(load_embed_config(args.config, **overrides))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    sys.exit(main(__doc__, EmbedConfig, backfill))
