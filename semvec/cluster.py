"""Where jobs run: the cluster at RAY_ADDRESS (as under `ray job submit`), else a local Ray."""

from __future__ import annotations

import logging
import os
import socket

# Ray Train V2 starts a detached PlacementGroupCleaner beside every run. It asks the State API,
# once a second, whether the run's controller is alive, and removes the run's placement group
# when the answer is "no such actor".
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def init_ray(env_vars: dict[str, str] | None = None) -> bool:
    """Connect to RAY_ADDRESS (also set under `ray job submit`), else start a local Ray.

    `env_vars` are set in every worker of this job (on a cluster, workers do not inherit the
    driver's environment). Returns True when a local Ray was started here.
    """
    # Ray's usage statistics are on by default: a local head would report to Ray's collector.
    # Off unless the user turned them on (RAY_USAGE_STATS_ENABLED=1 is kept).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env={"env_vars": env_vars} if env_vars else None)
        return False
    # One logical CPU more than the cores: a slot for the Ray Train controller and driver tasks
    # beside the training workers (a backfill's IO tasks claim no CPU; see backfill.job).
    # No dashboard, so the State API has no HTTP server here. Its address in this cluster's
    # store is set to a port of our own rather than the default 8265, where another Ray's
    # dashboard may be serving (see _local_worker_setup).
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
             dashboard_port=free_port(), logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": _local_worker_setup})
    return True


def _local_worker_setup() -> None:
    """Run in every worker process of the local Ray that init_ray starts.

    Without an address, a worker's State API call picks a Ray of its own choosing on this machine
    (the last `ray start`, or fails on several). Ray Train's PlacementGroupCleaner then asks
    another cluster about this run's controller, hears "no such actor" and takes it for dead: it
    removes the run's placement group if that is registered by then, and stops either way (seen
    with a `ray start --head` beside a local run). Pin it to this cluster; here the query fails (no
    dashboard), harmlessly: the whole local Ray stops with the driver, which leaves the cleaner
    nothing to clean. Its warning about each failed query, once a second, is kept out of the log.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
