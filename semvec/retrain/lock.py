"""One retraining at a time per state prefix: a lock object that its holder renews while it runs
(every timeout / 6, at most 5 minutes), stale once not renewed for the timeout; a lock whose
holder ran on this machine (same boot, same process namespace) and has ended is taken at once. A
holder checks the lock is still its own (`check`) before each write of state or registry: one
whose lock was taken over (renewals failed for the whole timeout) stops there.

On a local disk the lock is created with O_EXCL, which is atomic. Plain S3 has no create-if-absent
for every S3-compatible store, so there the lock is written, read back after a pause, and held
only if it still carries this holder's token. Two runs can then both hold it only if one of them
takes over a second between its first read and its write (so that the other's whole write, pause
and read-back falls in between), or if the store is not read-after-write consistent (AWS S3 is).
A scheduler that never overlaps runs (a Kubernetes CronJob's `concurrencyPolicy: Forbid`; KubeRay's
RayCronJob has none) is the first line; this lock is the second. S3's conditional writes
(If-None-Match) would close the gap where a store has them; not used yet.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from semvec import storage
from semvec.errors import ConfigError, JobFailed

log = logging.getLogger("semvec.retrain")

LOCK = "lock.json"


class LockHeld(ConfigError):
    """Another run holds the lock: refused before any work (exit code 3)."""

    exit_code = 3


class Lock:
    def __init__(self, state: str, timeout_s: float):
        self.uri = storage.join(state, LOCK)
        self.fs = storage.filesystem(state)
        self.path = storage.strip(self.uri)
        self.timeout_s = timeout_s
        self.token = uuid.uuid4().hex
        self.took_stale: dict | None = None
        self.record: dict | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._writing = threading.Lock()  # a renewal and the release never interleave

    def acquire(self) -> None:
        now = time.time()
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "since": now, "renewed_at": now, "processes": _process_space()}
        held = self._read()
        if held is not None:
            quiet = time.time() - _renewed_at(held)
            if quiet < self.timeout_s and not _holder_gone(held):
                raise LockHeld(
                    f"another retraining holds {storage.display(self.uri)} (host {held.get('host')}, "
                    f"pid {held.get('pid')}, since {time.time() - float(held.get('since', 0)):.0f} s, "
                    f"renewed {quiet:.0f} s ago; stale after {self.timeout_s:.0f} s unrenewed)")
            if self._read() != held:  # another run took it over first
                raise self._raced()
            self.took_stale = held  # its holder died: take it over
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                raise self._raced() from None
        data = json.dumps(record).encode()
        if storage.is_remote(self.uri):
            storage.write_atomic(self.fs, self.path, data)
            self._read_back()
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise self._raced() from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if self.took_stale is not None:  # two runs taking one stale lock over: read back, as on S3
                self._read_back()
        self.record = record
        self._thread = threading.Thread(target=self._renew, name="semvec-retrain-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """Rewrite the record with a fresh renewed_at while this run holds it; stop when it is not
        its own any more (taken over after renewals failed for the timeout)."""
        interval = min(max(self.timeout_s / 6, 0.2), 300.0)
        while not self._stop.wait(interval):
            try:
                with self._writing:
                    if self._stop.is_set():  # released meanwhile: a write now would bring it back
                        return
                    if not self._holds():
                        self._lost.set()
                        return
                    self.record = {**self.record, "renewed_at": time.time()}
                    storage.write_atomic(self.fs, self.path, json.dumps(self.record).encode())
            except Exception as exc:  # noqa: BLE001 - a store down for a while: try again next time
                log.warning("the retraining lock %s was not renewed (%s); it goes stale after %.0f s "
                            "unrenewed", storage.display(self.uri), type(exc).__name__, self.timeout_s)

    def check(self) -> None:
        """Raise JobFailed unless the lock is still this run's: before each write of the round's
        state or the registry."""
        if self._lost.is_set() or not self._holds():
            self._lost.set()
            raise JobFailed(f"the retraining lock {storage.display(self.uri)} was taken over by another "
                            "run (this one's renewals failed for lock_timeout_s); stopped before "
                            "writing state or the registry")

    def _read_back(self) -> None:
        """Held only if the lock, read a second after this run wrote it, still carries its token."""
        time.sleep(1.0)
        if not self._holds():
            raise self._raced()

    def _holds(self) -> bool:
        """Whether the lock as stored now carries this run's token."""
        return (self._read() or {}).get("token") == self.token

    def _raced(self) -> LockHeld:
        return LockHeld(f"another retraining took {storage.display(self.uri)} at the same moment")

    def release(self) -> None:
        with self._writing:  # after any renewal in flight; none starts after this
            self._stop.set()
            if self._holds():
                self.fs.rm(self.path)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as held since the epoch (stale)
            return {"since": 0}

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _renewed_at(held: dict) -> float:
    """When the holder last renewed its lock (a lock written before renewals: when it was taken)."""
    try:
        return float(held.get("renewed_at", held.get("since", 0)))
    except (TypeError, ValueError):
        return 0.0


def _process_space() -> str | None:
    """This boot of this machine and this process namespace (Linux): where a pid names one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _holder_gone(held: dict) -> bool:
    """The holder ran where this process runs (same boot, same pid namespace) and has ended: a run
    killed on this machine, whose lock is taken over at once rather than after the timeout."""
    here = _process_space()
    if here is None or held.get("processes") != here or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
