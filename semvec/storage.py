"""URIs and filesystems: local paths and s3:// (any S3-compatible store).

Credentials and the endpoint come from the standard AWS environment variables only
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL[_S3],
AWS_REGION); they are never logged and never written anywhere by semvec.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.utils import glob_translate

from semvec import crashpoints, redact
from semvec.errors import ConfigError


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


S3_MAX_ATTEMPTS = 10  # 9 retries: backoff of about 1 minute on average (under 2) before a call fails


def filesystem(uri: str) -> fsspec.AbstractFileSystem:
    """The filesystem for a URI. S3 settings come from the environment, read at call time.

    A URI with credentials in it (``s3://key:secret@bucket/``) is refused, whatever its scheme:
    they would reach error messages, logs and manifests, and s3fs would not use them anyway.
    """
    if redact.has_userinfo(uri):
        raise ConfigError(f"credentials in a URI are not accepted ({display(uri)!r}); "
                          "use the AWS_* environment variables")
    if is_remote(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        # skip_instance_cache: a fresh client sees the environment as it is now.
        return fsspec.filesystem("s3", client_kwargs=client_kwargs, config_kwargs=_s3_retries(),
                                 skip_instance_cache=True)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise ConfigError(f"unsupported URI scheme {scheme!r} in {display(uri)!r}; "
                          "allowed: local paths, s3://")
    return fsspec.filesystem("file")


def _s3_retries() -> dict:
    """botocore's "standard" retries, more of them than its default 3: a store that restarts or
    throttles is waited for with exponential backoff and jitter (up to 20 s a wait), not failed
    on. AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, botocore's own variables, set them otherwise."""
    try:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
    except ValueError:
        raise ConfigError(f"AWS_MAX_ATTEMPTS must be an integer, got "
                          f"{os.environ['AWS_MAX_ATTEMPTS']!r}") from None
    return {"retries": {"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": attempts},
            "connect_timeout": 10}


def basename(path: str) -> str:
    """The last name of a local path or an fsspec listing's entry (a folder's may end in "/")."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def strip(uri: str) -> str:
    """The path part the filesystem expects (no scheme, no trailing slash)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri[len("s3://"):].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def display(uri: str) -> str:
    """A URI safe to print: userinfo, query-string credentials and secret values are masked."""
    return redact.redact(uri)


@dataclass(frozen=True)
class InputFile:
    uri: str  # full URI, s3://... or an absolute local path
    relative: str  # path relative to the input root: names ids and output parts
    size: int
    version: str  # mtime or ETag: tells a changed file from a finished one


_SKIP_NAMES = ("_", ".")  # _SUCCESS, _manifest.json, .crc and friends are not data


def list_inputs(uri: str, what: str = "input") -> list[InputFile]:
    """Expand a file, a folder (recursively) or a glob into data files, sorted by path; `what`
    names the setting in errors."""
    fs = filesystem(uri)
    path = strip(uri)
    prefix = "s3://" if is_remote(uri) else ""
    try:
        if globlib.has_magic(path):
            root = _glob_root(path, remote=is_remote(uri))
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            root = path
            paths = [p for p in fs.find(path) if fs.isfile(p)]
        elif fs.isfile(path):
            root = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
            paths = [path]
        else:
            raise ConfigError(f"{what} {display(uri)!r} does not exist (a file, folder or glob)")
    except (PermissionError, OSError) as exc:
        raise ConfigError(f"{what} {display(uri)!r} cannot be listed: {type(exc).__name__}") from None
    files = []
    for p in sorted(paths):
        rel = os.path.relpath(p, root) if not is_remote(uri) else p[len(root):].lstrip("/")
        if any(part.startswith(_SKIP_NAMES) for part in rel.split("/")):
            continue
        info = fs.info(p)
        version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
        files.append(InputFile(prefix + p, rel, int(info.get("size") or 0), version))
    if not files:
        raise ConfigError(f"{what} {display(uri)!r} holds no data files")
    return files


def _glob_root(path: str, remote: bool) -> str:
    """The folder a glob's matches are named from: its leading components without * ? or [...]."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if globlib.has_magic(part))
    root = "/".join(parts[:fixed])
    return root or ("" if remote else "/")


def check_writable(uri: str) -> None:
    """Write and delete a probe object under the output prefix, or fail with one line. A local
    output that is not there yet is probed in the nearest folder above it that is: nothing is
    made, so a command refused later leaves no trace, and no other job's folder is removed."""
    fs = filesystem(uri)
    where = strip(uri)
    if not is_remote(uri):
        path = Path(where)
        there = next(q for q in (path, *path.parents) if q.exists() or q == q.parent)
        if not there.is_dir():
            said = "is a file" if there == path else f"lies beneath the file {str(there)!r}"
            raise ConfigError(f"output {display(uri)!r} {said}; an output is a folder (or s3:// "
                              "prefix) of its own")
        where = str(there)
    probe = join(where, f"{PROBE_MARK}{uuid.uuid4().hex}")
    try:
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise ConfigError(
            f"output {display(uri)!r} is not writable ({type(exc).__name__}); "
            "give a local folder or s3:// prefix you can write to"
        ) from None


def check_file_writable(uri: str, what: str = "output", overwrite: bool = True) -> None:
    """Refuse, in one line before any work, a file that cannot be written where it is asked for:
    a folder, beneath a file, in a folder that cannot be made or written (a probe is written and
    deleted beside it), or one that exists when `overwrite` is False."""
    fs, path = filesystem(uri), strip(uri)
    try:
        exists = fs.exists(path)
        folder = exists and fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be asked cannot be written
        raise ConfigError(f"{what} {display(uri)!r} cannot be checked ({type(exc).__name__})") from None
    if folder:
        raise ConfigError(f"{what} {display(uri)!r} is a directory; give a file name")
    if exists and not overwrite:
        raise ConfigError(f"{what} {display(uri)!r} exists; pass --overwrite to replace it")
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        check_writable(f"s3://{parent}" if is_remote(uri) else parent)
    except ConfigError:
        raise ConfigError(f"{what} {display(uri)!r} cannot be written there; give a path you can "
                          "write to") from None


def check_apart(source: str, output: str, what: str, source_what: str = "the vectors' prefix",
                holding: bool = False) -> None:
    """Refuse, in one line before any work, an output prefix that is the source's or inside it, and
    with `holding` also one that holds the source (an output replaced whole would delete it).
    Local paths are compared resolved (links followed)."""
    where = {"same": "is", "inside": "lies inside", "holds": "holds" if holding else None}.get(
        placement(source, output))
    if where:
        raise ConfigError(f"{what} {display(output)!r} {where} {source_what} {display(source)!r}; "
                          f"choose a {'prefix' if is_remote(output) else 'folder'} of its own")


def placement(source: str, output: str) -> str | None:
    """Where `output` lies against `source`: "same", "inside" it, "holds" it, or None (apart, or one
    remote and one local). Local paths are compared resolved (links followed, `./` and `..` gone)."""
    if is_remote(source) != is_remote(output):
        return None
    if is_remote(output):
        src, out = strip(source).rstrip("/"), strip(output).rstrip("/")
        inside, holds = out.startswith(src + "/"), src.startswith(out + "/")
    else:  # resolved as given: links first, then `..` (an abspath would drop `link/..` as text)
        src, out = (Path(os.path.expanduser(u.removeprefix("file://"))).resolve() for u in (source, output))
        inside, holds = src in out.parents, out in src.parents
    return "same" if src == out else "inside" if inside else "holds" if holds else None


def glob_lists(pattern: str, path: str) -> bool:
    """Whether the input glob `pattern` (local or s3://) matches the file at `path`, as
    list_inputs would list it (fsspec's glob: `*` stays within a folder, `**` crosses them)."""
    if is_remote(pattern) != is_remote(path) or not any(c in strip(pattern) for c in "*?["):
        return False
    if is_remote(pattern):
        src, out = strip(pattern), strip(path)
    else:
        src, out = os.path.abspath(strip(pattern)), os.path.abspath(strip(path))
    return re.match(glob_translate(src), out) is not None


TEMP_MARK = ".tmp-"  # a local write in progress: `<path>.tmp-<uuid>`, renamed into place when whole
PROBE_MARK = "_probe-"  # check_writable's object: a crash may leave one; outputs ignore it
# a backfill's (and a compression's) part: part-<source key>-<first row>-<last row>.parquet
# (backfill.stages.part_name). Only these count as parts: `part-0000.parquet` of Spark or pyarrow
# is someone else's file, never listed, read or removed as ours.
PART = re.compile(r"part-[0-9a-f]{12}-\d{12}-\d{12}\.parquet")


def is_part(path: str) -> bool:
    """Whether the file at path (its last name) is a part semvec writes."""
    return PART.fullmatch(basename(path)) is not None


# a temporary of write_atomic: `<name>.tmp-<32 hex>` (uuid4().hex), left by a crash before its rename
TEMPORARY = re.compile(rf"(.+){re.escape(TEMP_MARK)}[0-9a-f]{{32}}")


def written_by_us(name: str, ours: Callable[[str], bool]) -> bool:
    """Whether the file `name` in an output is one that output writes: a name `ours` accepts, a
    temporary of one (a local write that a crash cut short before its rename), or a probe of
    check_writable. Anything else is someone else's file, never removed."""
    temporary = TEMPORARY.fullmatch(name)
    base = temporary.group(1) if temporary else name
    return base.startswith(PROBE_MARK) or ours(base)


def remove_temporaries(fs: fsspec.AbstractFileSystem, folder: str, ours: Callable[[str], bool]) -> None:
    """Remove the temporaries of this output's own files in a local folder (a crash before a
    rename leaves them). Call only while holding the output's lease or lock: another writer's
    temporary is a write in progress. S3 writes leave none."""
    if _on_s3(fs) or not fs.exists(folder):
        return
    for p in fs.ls(folder, detail=False):
        temporary = TEMPORARY.fullmatch(basename(p))
        if temporary and ours(temporary.group(1)):
            fs.rm(p)


def put_atomic(uri: str, data: bytes, what: str = "") -> None:
    """write_atomic to a local path or s3:// URI."""
    write_atomic(filesystem(uri), strip(uri), data, what)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, what: str = "") -> None:
    """Write a whole object so that readers see all of it or nothing.

    S3 PUTs are atomic already; on a local disk write a temporary file and rename it. `what`
    describes the write to the crash points (the path when not given).
    """
    described = f"{what}: {path}" if what else path
    torn = crashpoints.torn() and not _on_s3(fs)  # the crash point before the rename (a test aid)
    if _on_s3(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if torn:  # a crash here leaves the temporary and no file
            crashpoints.wrote(described)
        os.replace(tmp, path)
    if not torn:
        crashpoints.wrote(described)


def _on_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


class Prefix:
    """An output prefix on local disk or s3:// whose JSON records (manifests) are written whole."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs = filesystem(uri)
        self.root = strip(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_json(self, name: str) -> dict | None:
        if not self.fs.exists(self.path(name)):
            return None
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, record: dict) -> None:
        blob = json.dumps(record, indent=2, sort_keys=True).encode()
        write_atomic(self.fs, self.path(name), blob)  # a durable write (a crash point)
