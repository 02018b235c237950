"""Fine-tuning, as a Ray job.

Local:    python -m pipelines.finetune --config pipelines/configs/finetune.yaml
Cluster:  ray job submit --working-dir . -- python -m pipelines.finetune --config ...
Every setting of the config has a flag that overrides it: --workers 4 --use-gpu --register NAME
"""

import sys

from pipelines._job import main
from semvec.options import add_config_flags, given
from semvec.train.config import MethodConfig, TrainConfig, load_train_config
from semvec.train.job import fit


def finetune(args, overrides: dict) -> dict:
    options = given(args, args.method_fields)
    if options:  # added to the config file's method options
        overrides["method_options"] = {**overrides.get("method_options", {}), **options}
    return fit(load_train_config(args.config, **overrides), register=args.register,
               experiment=args.experiment)


def extra_flags(parser) -> None:
    """The method options one by one, --register and --experiment, as `semvec train` has them."""
    parser.set_defaults(method_fields=add_config_flags(parser, MethodConfig, title="method options"))
    parser.add_argument("--register", help="register the model under this name in the MLflow registry "
                                           "(default: log only)")
    parser.add_argument("--experiment", default="semvec", help="MLflow experiment (default: semvec)")


if __name__ == "__main__":
    sys.exit(main(__doc__, TrainConfig, finetune, extra=extra_flags))
