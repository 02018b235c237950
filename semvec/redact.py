"""One place that takes credentials out of text before it is shown, logged or stored.

`redact` masks, anywhere in a text (error messages carry URIs mid-sentence):
- the whole userinfo of every URI: ``scheme://user:password@host`` -> ``scheme://***@host``. The
  user goes too: a lone userinfo is often a token (``https://TOKEN@host``), and an access key id
  is a credential of its own;
- credentials in query strings and ``key=value`` text (``X-Amz-Signature=``, ``token=``,
  ``password=``, ...) and ``Bearer`` tokens;
- the value of every secret environment variable set now (AWS_SECRET_ACCESS_KEY, HF_TOKEN,
  MLFLOW_TRACKING_PASSWORD, any ``*_PASSWORD``, ``*_SECRET``, ``*_SECRET_KEY``, ``*_TOKEN``, ...),
  as written and percent-encoded. Values shorter than MIN_SECRET_LENGTH are left alone: masking
  "1" or "true" would mangle every message.

This module imports nothing of semvec: storage, tracking and the CLI all build on it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from urllib.parse import quote

MASK = "***"
MIN_SECRET_LENGTH = 6
SECRET_NAMES = frozenset({
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN",
})
# _SECRET_KEY: MLFLOW_FLASK_SERVER_SECRET_KEY, the key MLflow's basic-auth app signs sessions with
SECRET_SUFFIXES = ("_PASSWORD", "_SECRET", "_TOKEN", "_SECRET_ACCESS_KEY", "_SECRET_KEY", "_API_KEY")

_QUOTES = "'\"<>`"
# scheme://AUTHORITY: the authority runs to the first / ? # (or a space or quote); the userinfo is
# all of it before its last @ (greedy, so a raw @ in a password is covered). models:/NAME@ALIAS has
# no // and is left alone.
_USERINFO = re.compile(rf"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s{_QUOTES}]*@")
# Names that mean a credential wherever they stand before '='; short, common ones (key, sig, auth)
# only right after ? or & of a query string.
_STRONG_KEYS = (
    r"x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|signature"
    r"|awsaccesskeyid|(?:access_|id_|refresh_|auth_|session_)?token|password|passwd|pwd"
    r"|(?:client_)?secret|api[_-]?key|apikey"
)
_ASSIGNED = re.compile(
    rf"(?P<key>(?:(?<![A-Za-z0-9_])(?:{_STRONG_KEYS})|(?<=[?&;])(?:key|sig|auth|code))=)"
    rf"[^&#\s{_QUOTES}]+",
    re.IGNORECASE,
)
# "Bearer X" anywhere; "Basic"/"Token" only after "Authorization:" (else "Token authentication").
_BEARER = re.compile(r"(?P<kind>\bBearer|\bAuthorization:\s*\w+)\s+[A-Za-z0-9._~+/=\-]{8,}",
                     re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret."""
    upper = name.upper()
    return upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)


def _secret_values() -> list[str]:
    """Secret values set in the environment now, longest first (so no shorter one cuts a longer)."""
    values = set()
    for name, value in os.environ.items():
        if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH:
            values |= {value, quote(value, safe="")}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """The text with every credential it holds replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    text = str(text)
    for value in _secret_values():
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _ASSIGNED.sub(rf"\g<key>{MASK}", text)
    return _BEARER.sub(rf"\g<kind> {MASK}", text)


def has_userinfo(uri: str) -> bool:
    """Whether a URI carries userinfo (``user[:password]@``) in its authority."""
    return bool(_USERINFO.search(uri))


class RedactingFilter(logging.Filter):
    """Redacts a record's message, its arguments, and its traceback text, before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not hide the record
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_HANDLER_NAME = "semvec-redacting"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirect, pytest's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property wins
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log the `semvec` loggers to stderr through RedactingFilter; quiet MLflow unless verbose.

    The filter sits on the handler, not only on the logger: a logger's own filters never see the
    records of its children (semvec.backfill, ...), a handler's see every record it writes.
    """
    logger = logging.getLogger("semvec")
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.addFilter(RedactingFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.addFilter(RedactingFilter())
        logger.propagate = False  # no second, unredacted copy through the root's handlers
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # model-loading bars (transformers follows huggingface_hub's switch)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose and "MLFLOW_LOGGING_LEVEL" not in os.environ:
        # MLflow sets its logger's level from this variable when it is imported, here and in every
        # Ray worker (they inherit the environment); a level set now covers an earlier import.
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
