"""Where jobs run: the cluster at RAY_ADDRESS (as under `ray job submit`), else a local Ray."""

from __future__ import annotations

import logging
import os


def init_ray() -> bool:
    """Connect to RAY_ADDRESS (also set under `ray job submit`), else start a local Ray.

    Returns True when a local Ray was started here.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    # One logical CPU more than the cores: the actor pool takes one per core, and the light
    # read/tokenize/write tasks need a slot of their own or they starve behind it.
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
             logging_level=logging.WARNING)
    return True
