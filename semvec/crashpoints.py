"""A test aid: SEMVEC_CRASH_AT=N kills the job by SIGKILL right after its N-th durable write.

Every write of the backfill's commit protocol (each output part, quarantine part, manifest and
lease write, and the lease's release) calls `wrote()`. The count is kept across all processes of
the job (driver and Ray workers) in a counter file, so N names one moment of the whole job, and the
process that makes the N-th write kills the driver's session (the driver, a local Ray and all its
workers), and itself: no clean-up runs anywhere, as after a power cut. Linux only, like the tests.
Unset (the default), `wrote()` does nothing. SEMVEC_CRASH_ONLY=TEXT counts only the writes whose
description holds TEXT (a retraining round's own writes, say, not those of the training inside it).
SEMVEC_CRASH_TORN=1 moves the crash point of a local atomic write (storage.write_atomic: a
temporary file, then a rename) to before its rename, so the N-th write dies leaving its temporary
and not its file; the numbering is the same.

The driver calls `arm()` before Ray starts; it fixes the counter file and the driver's pid in the
environment, and `worker_env()` hands them to Ray workers (through the job's runtime_env).
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile

CRASH_AT = "SEMVEC_CRASH_AT"
ONLY = "SEMVEC_CRASH_ONLY"
COUNTER = "SEMVEC_CRASH_COUNTER"
DRIVER = "SEMVEC_CRASH_DRIVER_PID"
TORN = "SEMVEC_CRASH_TORN"


def armed() -> bool:
    return bool(os.environ.get(CRASH_AT))


def torn() -> bool:
    """Whether a local write's crash point comes before its rename (SEMVEC_CRASH_TORN)."""
    return armed() and bool(os.environ.get(TORN))


def arm() -> None:
    """On the driver, before any write: a fresh counter and this process as the one to kill.
    Commands run one after another in one process (a build, then a search) share one counter."""
    if not armed() or os.environ.get(DRIVER) == str(os.getpid()):
        return
    fd, path = tempfile.mkstemp(prefix="semvec-crash-", suffix=".count")
    os.close(fd)
    os.environ[COUNTER] = path
    os.environ[DRIVER] = str(os.getpid())


def worker_env() -> dict[str, str]:
    """The variables a Ray worker needs to count and crash with the driver (empty when unset)."""
    return {k: os.environ[k] for k in (CRASH_AT, ONLY, TORN, COUNTER, DRIVER) if os.environ.get(k)}


def wrote(what: str = "") -> None:
    """Count one durable write; the N-th one kills the whole job."""
    if not armed() or not os.environ.get(COUNTER):  # set, but this job never armed: no crash point
        return
    if os.environ.get(ONLY) and os.environ[ONLY] not in what:
        return
    at = int(os.environ[CRASH_AT])
    with open(os.environ[COUNTER], "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # driver and workers count into one file
        f.seek(0)
        count = len(f.read()) + 1
        f.write("x")
        f.flush()
    if count == at:
        _kill_everything()


def _kill_everything() -> None:
    driver = int(os.environ[DRIVER])
    # A driver that leads its own session (as a shell or a test starts it) takes down the whole
    # session: a local Ray's GCS, raylet and every worker (each in a process group of its own).
    # Otherwise only the driver: never the processes of whatever launched it.
    try:
        leads = os.getsid(driver) == driver
    except ProcessLookupError:
        leads = False
    if leads:
        kill_session(driver)
    _sigkill(driver)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` but this one (tests use it for real crashes)."""
    for pid in _session_members(sid):
        _sigkill(pid)


def _session_members(sid: int) -> list[int]:
    me = os.getpid()
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
