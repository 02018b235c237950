"""One writer at a time per prefix: a lease held while a job runs, taken over only when stale.

Local disk: the lease file is locked with flock(2) for the whole run. The kernel holds the lock
and drops it when the holder dies (a SIGKILL included), so a lease is never stale there and a
rerun after a crash takes it at once. The file also names the holder, for the refusal message.
On NFS this needs working byte-range locks (NFSv4); across machines use s3://.

S3: the lease is an object naming its holder, renewed every ttl/4 by a background thread. It is
created with `If-None-Match: *` and taken over (when its holder has not renewed it for ttl_s, or
is a dead process on this host) with `If-Match: <its ETag>`; AWS S3 refuses the loser of a race
with 412. Stores that ignore conditional writes (rclone's, some others) accept both writes, so
after each write the lease is read back after a pause and held only if it still carries this
holder's token: two runs then both hold it only if one writes between the other's write and its
read-back one second later, or if the store is not read-after-write consistent (AWS S3 is). A
scheduler that never overlaps runs (a Kubernetes CronJob's `concurrencyPolicy: Forbid`; KubeRay's
RayCronJob has none) is the first line; this lease is the second. A holder that finds its lease
gone or taken says so (`lost`), and the job stops with an error instead of finishing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from semvec import crashpoints, storage
from semvec.errors import ConfigError, JobFailed

READ_BACK_S = 1.0

log = logging.getLogger("semvec.lease")


class LeaseHeld(ConfigError):
    """Another run holds the lease: refused before any work (exit code 3)."""

    exit_code = 3


class Lease:
    """`with Lease(prefix, "_lease.json", what="backfill"):` holds the prefix for the block."""

    def __init__(self, prefix: str, name: str, what: str, ttl_s: float = 120.0):
        self.uri = storage.join(prefix, name)
        self.fs = storage.filesystem(prefix)
        self.path = storage.strip(self.uri)
        self.what = what
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self.took_stale: dict | None = None  # the record of a dead holder this lease replaced
        self.lost = threading.Event()
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public

    def acquire(self) -> None:
        if storage.is_remote(self.uri):
            self._acquire_s3()
            self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="semvec-lease")
            self._thread.start()
        else:
            self._acquire_local()

    def lost_error(self) -> JobFailed:
        """The error a job stops with when its lease went to another run."""
        prefix = self.uri.rsplit("/", 1)[0]
        return JobFailed(f"the lease on {storage.display(prefix)} was lost to another run; "
                         "stopped so that two runs do not write one prefix")

    def holds(self) -> bool:
        """Whether this run still holds the lease. On S3 the lease is read back now: the renewal
        thread looks only every ttl/4, and a job asks this before it calls its output complete."""
        if storage.is_remote(self.uri) and not self.lost.is_set():
            held = self._read()
            if held is None or held.get("token") != self.token:
                self.lost.set()
        return not self.lost.is_set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays, naming its last holder
            self._fd = None
        elif storage.is_remote(self.uri) and not self.lost.is_set():
            try:
                held = self._read()
                if held is not None and held.get("token") == self.token:
                    self.fs.rm(self.path)
                    crashpoints.wrote("lease release")
            except Exception as exc:  # noqa: BLE001 - the store is down: the lease goes stale
                log.warning("the lease %s could not be released (%s); it is stale after %.0f s",
                            storage.display(self.uri), type(exc).__name__, self.ttl_s)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ local: flock

    def _acquire_local(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _parse(os.pread(fd, 65536, 0))
            os.close(fd)
            raise LeaseHeld(self._held_message(held)) from None
        previous = _parse(os.pread(fd, 65536, 0))
        if previous and previous.get("token"):
            self.took_stale = previous  # a run that died holding it (the kernel let it go)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        os.fsync(fd)
        self._fd = fd
        crashpoints.wrote("lease")

    # ------------------------------------------------------------ S3: conditional writes

    def _acquire_s3(self) -> None:
        held, etag = self._read_with_etag()
        if held is not None and not self._stale(held):
            raise LeaseHeld(self._held_message(held))
        condition = {"IfMatch": etag} if held is not None else {"IfNoneMatch": "*"}
        if held is not None:
            self.took_stale = held
        self._put(condition)
        time.sleep(READ_BACK_S)
        now_held = self._read()
        if now_held is None or now_held.get("token") != self.token:
            raise LeaseHeld(self._held_message(now_held, raced=True))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                held = self._read()
                if held is None or held.get("token") != self.token:
                    self.lost.set()
                    return
                self._put({"IfMatch": self._etag} if self._etag else {})
            except LeaseHeld:
                self.lost.set()
                return
            except Exception:  # noqa: BLE001 - a store hiccup: try again next round, until stale
                continue

    def _put(self, condition: dict) -> None:
        bucket, key = self.path.split("/", 1)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._record(),
                                  **{k: v for k, v in condition.items() if v})
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                raise LeaseHeld(self._held_message(self._read(), raced=True)) from None
            raise
        self._etag = out.get("ETag")
        crashpoints.wrote("lease")

    def _read_with_etag(self) -> tuple[dict | None, str | None]:
        try:
            info = self.fs.info(self.path, refresh=True)
            with self.fs.open(self.path, "rb", cache_type="none") as f:
                return _parse(f.read()), info.get("ETag")
        except FileNotFoundError:
            return None, None

    def _read(self) -> dict | None:
        return self._read_with_etag()[0]

    # ------------------------------------------------------------ shared

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "what": self.what, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": time.time(),
                           "ttl_s": self.ttl_s}).encode()

    def _stale(self, held: dict) -> bool:
        age = time.time() - float(held.get("renewed_at", 0))
        if age > float(held.get("ttl_s", self.ttl_s)):
            return True
        return held.get("host") == socket.gethostname() and not _alive(held.get("pid"))

    def _held_message(self, held: dict | None, raced: bool = False) -> str:
        where = storage.display(self.uri)
        if not held:
            return f"another run took {where} at the same moment"
        age = time.time() - float(held.get("renewed_at", time.time()))
        return (f"{where} is held by another {held.get('what', 'run')} (host {held.get('host')}, "
                f"pid {held.get('pid')}, renewed {age:.0f} s ago"
                + (f"; stale after {float(held.get('ttl_s', self.ttl_s)):.0f} s)"
                   if storage.is_remote(self.uri) else ")")
                + ("; it took the lease at the same moment" if raced else ""))


def _parse(blob: bytes) -> dict | None:
    if not blob:
        return None
    try:
        record = json.loads(blob)
    except ValueError:
        return {"renewed_at": 0}  # torn or foreign: stale
    return record if isinstance(record, dict) else {"renewed_at": 0}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _precondition_failed(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text
