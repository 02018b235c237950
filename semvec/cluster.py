"""Where jobs run: the cluster at RAY_ADDRESS (as under `ray job submit`), else a local Ray."""

from __future__ import annotations

import logging
import os
import socket
import sys

from semvec.errors import ConfigError, TaskFailed

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
    _quiet_auth_notice()
    started = ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
                       dashboard_port=free_port(), logging_level=logging.WARNING,
                       runtime_env={"worker_process_setup_hook": _local_worker_setup,
                                    **({"env_vars": env_vars} if env_vars else {})})
    _started_here.add(started.address_info["gcs_address"])
    return True


def _quiet_auth_notice() -> None:
    """A local Ray turns token authentication on and says so with a WARNING that suggests turning
    it off. semvec keeps it on (README, "Cluster"), so that notice is dropped; every other message
    of that logger (a missing token, authentication off) still shows."""
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _AuthNoticeFilter) for f in notice.filters):
        notice.addFilter(_AuthNoticeFilter())


class _AuthNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


_started_here: set[str] = set()  # the GCS addresses of the local Rays init_ray started


def on_a_cluster() -> bool:
    """Whether this process works on a Ray cluster: RAY_ADDRESS is set (also under `ray job
    submit`), or the caller connected to a Ray that init_ray did not start as a local one."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().gcs_address not in _started_here


def gather(refs: list, what: str) -> list:
    """ray.get(refs), or TaskFailed in one line naming `what` and the task's own error."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as exc:  # a task that raised, or a worker lost past its retries
        raise _task_failed(what, getattr(exc, "cause", None) or exc) from None


def call_here(what: str, fn, *args):
    """fn(*args) in this process, for a job small enough to skip Ray: its error is the TaskFailed
    that `gather` would give for the same function run as a Ray task."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported as the task's own error, in one line
        raise _task_failed(what, exc) from None


def _task_failed(what: str, cause: BaseException) -> TaskFailed:
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return TaskFailed(f"{what} failed: {type(cause).__name__}: {first}")


def quiet_ray_data() -> None:
    """Ray Data's progress bars, its plan and context dump at the start of each execution, its INFO
    lines and its advice (UserWarnings) stay out of the terminal unless semvec runs with -v: the job
    reports its own progress. Verbose is what setup_logging set on the semvec logger."""
    import warnings

    import ray.data

    verbose = logging.getLogger("semvec").isEnabledFor(logging.DEBUG)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # its notice that the bars are off, which is what we asked for
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data")


def quiet_worker_env() -> dict[str, str]:
    """Environment for a job's Ray workers: no model-loading progress bars unless -v."""
    if logging.getLogger("semvec").isEnabledFor(logging.DEBUG):
        return {}
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' loading bars follow it too


def check_local_resources(what: str, cpus: float, gpus: float) -> None:
    """Before a local Ray starts: refuse a request this machine cannot hold (a job would wait for
    it forever). On a cluster (RAY_ADDRESS) the autoscaler may still bring it: nothing is checked."""
    if os.environ.get("RAY_ADDRESS"):
        return
    have_cpus = os.cpu_count() or 1
    if cpus > have_cpus:
        raise ConfigError(f"{what} asks for {cpus:g} CPU(s) but this machine has {have_cpus}; "
                          "ask for fewer, or set RAY_ADDRESS to run on a cluster")
    if gpus:
        import torch

        have_gpus = torch.cuda.device_count()
        if gpus > have_gpus:
            raise ConfigError(f"{what} asks for {gpus:g} GPU(s) but this machine has {have_gpus}; "
                              "ask for none, or set RAY_ADDRESS to run on a cluster")


def _local_worker_setup() -> None:
    """Run in every worker process of the local Ray that init_ray starts: pin the State API to
    this cluster.

    Without an address a worker's State API call picks a Ray of its own choosing on the machine.
    Ray Train's PlacementGroupCleaner asks it whether the run's controller is alive; asked of
    another cluster, the answer is "no such actor", and the cleaner would remove the run's
    placement group. Here the query fails instead (no dashboard), which is harmless: a local Ray
    stops with its driver. The cleaner's warning about each failed query is kept out of the log.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
