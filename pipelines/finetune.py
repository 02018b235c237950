"""Fine-tuning, as a Ray job.

Local:    python -m pipelines.finetune --config pipelines/configs/finetune.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.finetune --config ...
Settings can be overridden: --set workers=4 --set use_gpu=true --register NAME
"""

import sys

from pipelines._job import main
from semvec.train.config import load_train_config
from semvec.train.job import fit


def finetune(args, overrides: dict) -> dict:
    return fit(load_train_config(args.config, **overrides), register=args.register)


if __name__ == "__main__":
    sys.exit(main(__doc__, finetune, extra=lambda p: p.add_argument("--register")))
