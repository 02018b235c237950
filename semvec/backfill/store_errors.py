"""The store failing under a read, told apart from a file that is bad.

A file whose bytes are bad (a truncated gzip, a broken parquet footer) is the file's problem: its
rest goes to quarantine as `unreadable_file` and the job goes on. An error raised by the store's
own file object (a connection refused after botocore's retries, a local EIO, a file gone since it
was listed) says nothing about the bytes: it is a StoreError, which ends the job with one line and
leaves the file undone, so that a rerun reads it again. The two are told apart by where the error
comes from (the store's file object, wrapped in StoreStream), not by its type: a bad gzip header
is an OSError too.
"""

from __future__ import annotations

import io
import logging
import sys

from semvec.redact import redact


class StoreError(RuntimeError):
    """Reading a file failed in the store, not in its content: the job stops, the file stays undone."""


def store_error(relative: str, exc: BaseException) -> StoreError:
    first = redact(str(exc).strip().split("\n", 1)[0][:300])
    return StoreError(f"reading {relative!r} failed in the store ({type(exc).__name__}: {first})")


class StoreStream(io.RawIOBase):
    """The store's file object, with every error it raises turned into a StoreError.

    Parsers, gzip and pyarrow read through it and pass its errors on unchanged (pyarrow re-raises
    a Python file's own exception), so a StoreError always means the store failed, never the bytes.
    """

    def __init__(self, handle, relative: str):
        self._handle, self._relative = handle, relative

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._call(self._handle.read, len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._call(self._handle.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self._handle.tell)

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            finally:
                super().close()

    def _call(self, method, *args):
        try:
            return method(*args)
        except Exception as exc:  # noqa: BLE001 - whatever the store's file object raises
            raise store_error(self._relative, exc) from None


def found_in(exc: BaseException | None) -> StoreError | None:
    """The StoreError a read task raised, found in what Ray hands the driver (Ray wraps it, and
    adds lines to its message: only its first line is the read task's)."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StoreError):
            found = exc  # the innermost one is the read task's own
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found


def message_of(error: StoreError) -> str:
    return str(error.args[0] if error.args else error).split("\n", 1)[0]


class _NotOnTheConsole(logging.Filter):
    """Ray Data takes a read task's exception for its own bug and prints its traceback on the
    console. A StoreError is the job's to report, in one line: Ray's record of it is kept from
    Ray Data's console handler, and still goes to Ray Data's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]  # logged in an except
        return found_in(exc) is None


_FILTER = _NotOnTheConsole()


def keep_ray_tracebacks_quiet() -> None:
    """Put the filter on Ray Data's console handler (the one that is a stream, not a file)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
