"""Fine-tuning, as a Ray job.

Local:    python -m pipelines.finetune --config pipelines/configs/finetune.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.finetune --config ...
Every setting of the config has a flag that overrides it: --workers 4 --use-gpu --register NAME
"""

import sys

from pipelines._job import main
from semvec.train.config import TrainConfig, load_train_config
from semvec.train.job import fit


def finetune(args, overrides: dict) -> dict:
    return fit(load_train_config(args.config, **overrides), register=args.register)


if __name__ == "__main__":
    sys.exit(main(__doc__, TrainConfig, finetune, extra=lambda p: p.add_argument(
        "--register", help="register the model under this name in the MLflow registry")))
