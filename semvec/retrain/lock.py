"""One retraining at a time per state prefix: a lock object with a stale-lock timeout; a lock whose
holder ran on this machine (same boot, same process namespace) and has ended is taken at once.

On a local disk the lock is created with O_EXCL, which is atomic. Plain S3 has no create-if-absent
for every S3-compatible store, so there the lock is written, read back after a pause, and held
only if it still carries this holder's token. Two runs can then both hold it only if one of them
takes over a second between its first read and its write (so that the other's whole write, pause
and read-back falls in between), or if the store is not read-after-write consistent (AWS S3 is).
A scheduler that never overlaps runs (KubeRay / CronJob `concurrencyPolicy: Forbid`) is the first
line; this lock is the second. S3's conditional writes (If-None-Match) would close the gap where a
store has them; not used yet.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from semvec import storage
from semvec.errors import ConfigError

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

    def acquire(self) -> None:
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.time(), "processes": _process_space()}
        held = self._read()
        if held is not None:
            age = time.time() - float(held.get("since", 0))
            if age < self.timeout_s and not _holder_gone(held):
                raise LockHeld(
                    f"another retraining holds {storage.display(self.uri)} (host {held.get('host')}, "
                    f"pid {held.get('pid')}, for {age:.0f} s; stale after {self.timeout_s:.0f} s)")
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
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise self._raced() from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if self.took_stale is not None:  # two runs taking one stale lock over: read back, as on S3
            self._read_back()

    def _read_back(self) -> None:
        """Held only if the lock, read a second after this run wrote it, still carries its token."""
        time.sleep(1.0)
        if (self._read() or {}).get("token") != self.token:
            raise self._raced()

    def _raced(self) -> LockHeld:
        return LockHeld(f"another retraining took {storage.display(self.uri)} at the same moment")

    def release(self) -> None:
        if (self._read() or {}).get("token") == self.token:
            self.fs.rm(self.path)

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
