"""MLflow: runs, metrics, models and the registry.

Embedded default: a SQLite tracking store in the working directory (``sqlite:///mlflow.db``,
artifacts under ``./mlartifacts``); ``MLFLOW_TRACKING_URI`` points at a server. Only the config is
logged as params: secrets live in the environment and never enter a config, and every param and
tag passes through semvec.redact on the way (a URI's userinfo, a secret variable's value).
Resolving a registered model never creates a tracking store: a missing SQLite file is an error.

A server with authentication (MLflow's basic-auth app) takes the login from MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD; `refusal` turns its 401 or 403 into one line that says which it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from semvec import crashpoints, storage
from semvec.errors import ConfigError
from semvec.redact import redact

RUN_NAME_TAG = "semvec.run_name"


def tracking_uri() -> str:
    """The tracking URI, a server's checked to answer (once per process)."""
    uri = _configured_uri()
    _require_reachable(uri)
    return uri


def _configured_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_reached: set[str] = set()
REACH_TIMEOUT_S = 5.0


def _require_reachable(uri: str) -> None:
    """A tracking server that does not answer is one line, at once: MLflow's client retries a
    refused connection with backoff for minutes, printing nothing. Asked once per process."""
    if not uri.startswith(("http://", "https://")) or uri in _reached:
        return
    parts = urllib.parse.urlsplit(uri)
    proxied = urllib.request.getproxies().get(parts.scheme)
    if proxied and not urllib.request.proxy_bypass(parts.hostname or ""):
        return  # reached through a proxy, as MLflow's requests are: a direct connection proves nothing
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=REACH_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the MLflow tracking server at {storage.display(uri)} does not answer "
                          f"({type(exc).__name__}: {exc}); start it, or set MLFLOW_TRACKING_URI to "
                          "one that runs") from None
    _reached.add(uri)


def check_model_name(name: str) -> None:
    """MLflow's rule for registered model names, before any work: not empty, no '/' or ':'; and
    no quotes, which the registry's and runs' searches (by name) would have to escape."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/:'\"") \
            or name.strip() in (".", ".."):
        raise ConfigError(f"model name {name!r} cannot be registered: MLflow takes a name that is not "
                          "empty and has no '/' or ':' (and semvec none with quotes)")


def check_alias(alias: str) -> None:
    """MLflow's rule for aliases, before any work: letters, digits, '_' and '-', at most 255, and
    not 'latest' or v<digits> (those name versions)."""
    if not re.fullmatch(r"[\w\-]{1,255}", alias or "") or alias.lower() == "latest" \
            or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"alias {alias!r} cannot be set: MLflow takes 1 to 255 letters, digits, '_' "
                          "or '-', and not 'latest' or v<number> (they name versions)")


def registered(name: str) -> bool:
    """Whether the registry holds a model of this name (a missing local store holds none, and is
    not created by asking)."""
    if _missing_store(tracking_uri()) is not None:
        return False
    client = _client()
    try:
        client.get_registered_model(name)
        return True
    except Exception as exc:  # noqa: BLE001 - not found, or refused
        _raise_if_refused(exc)
        return False


def run_alive(run_id: str) -> bool:
    """Whether the tracking store holds this run, not deleted."""
    client = _client()
    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception as exc:  # noqa: BLE001 - not found, or refused
        _raise_if_refused(exc)
        return False


def refusal(exc: BaseException) -> ConfigError | None:
    """The tracking server's 401 (no or wrong login) or 403 (not permitted) behind exc, as one line
    naming the user and the request (never the password); None for any other error. Follows the
    exception's causes: a Ray task's error carries the original as `cause`."""
    status, request = _refused_request(exc)
    if status is None:
        return None
    where, user = storage.display(_configured_uri()), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 403:
        return ConfigError(f"MLflow at {where}: user {user!r} is not permitted to do this (HTTP 403 on "
                           f"{request}); an MLflow admin grants it (README: MLflow users and roles)")
    if not user:
        return ConfigError(f"MLflow at {where} needs a login (HTTP 401 on {request}): set "
                           f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return ConfigError(f"MLflow at {where} refused the login of user {user!r}: wrong username or "
                       f"password (HTTP 401 on {request}); check MLFLOW_TRACKING_USERNAME and "
                       f"MLFLOW_TRACKING_PASSWORD")


def _refused_request(exc: BaseException) -> tuple[int | None, str]:
    """(401 or 403, the request) from the first of exc's causes the tracking server refused."""
    for err in _causes(exc):
        status, request = _http_refusal(err)
        if status is not None:
            return status, request
    return None, ""


def _causes(exc: BaseException, depth: int = 8):
    """exc and what it was raised from (not what it was raised while handling: a lookup that fails
    in an except block is not caused by the error being handled)."""
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < depth:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or getattr(exc, "cause", None)


_REFUSED = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def _http_refusal(err: BaseException) -> tuple[int | None, str]:
    """(401 or 403, the request) when err is the tracking server refusing a request, else (None, "").
    MLflow's REST calls raise MlflowException with the status as its error_code; artifact downloads
    raise requests' HTTPError, counted only when it came from the tracking server."""
    code = getattr(err, "error_code", None)
    if isinstance(code, str) and code in _REFUSED:
        endpoint = re.search(r"endpoint (\S+)", str(err))
        return _REFUSED[code], endpoint.group(1) if endpoint else "a request"
    response = getattr(err, "response", None)
    status, url = getattr(response, "status_code", None), getattr(response, "url", None)
    if status in (401, 403) and isinstance(url, str) and url.startswith(_configured_uri()):
        method = getattr(getattr(response, "request", None), "method", None) or "GET"
        return status, f"{method} {url[len(_configured_uri()):].split('?')[0]}"
    return None, ""


def _raise_if_refused(exc: BaseException) -> None:
    """Re-raise a refused login or permission as its one line: never read it as "not found"."""
    refused = refusal(exc)
    if refused is not None:
        raise refused from None


def _raise_unless_absent(client, name: str, exc: BaseException) -> None:
    """Re-raise a refusal behind a failed lookup of a version or alias of model NAME, except the 403
    MLflow's basic-auth app gives when NAME does not exist (its own lookup then answers 404)."""
    if _refused_request(exc)[0] == 403:
        try:
            client.get_registered_model(name)
        except Exception as lookup:  # noqa: BLE001 - not found, or refused too
            _raise_if_refused(lookup)
            return
    _raise_if_refused(exc)


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking needs MLflow: pip install 'semvec[tracking]'") from None
    return mlflow


def metric_name(name: str) -> str:
    """MLflow refuses '@' in names: mrr@10 is logged as mrr_at_10."""
    return name.replace("@", "_at_")


@dataclass
class Tracker:
    """Picklable handle that training workers use to log to one run."""

    uri: str
    run_id: str

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        MlflowClient(self.uri).log_batch(self.run_id, metrics=batch)

    def history(self, names: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) points in step order; where a resumed run logged a step
        again, its last value."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        out = {}
        for name in names:
            points = sorted(client.get_metric_history(self.run_id, metric_name(name)),
                            key=lambda m: (m.step, m.timestamp))
            out[name] = sorted({m.step: m.value for m in points}.items())
        return out


def _artifact_location(uri: str) -> str | None:
    """A SQLite store keeps artifacts beside its file, not under whatever directory the first job
    happened to run in (under `ray job submit` that is a temporary copy of the working dir)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides (proxied artifacts) or MLflow's default applies


SETTINGS_TAG = "semvec.settings"  # what a run's checkpoints depend on (semvec.train.job.settings_hash)


def start_run(experiment: str, run_name: str, params: dict, settings: str | None = None,
              reuse_finished: bool = False) -> Tracker:
    """Reuse the latest run of the same name when it is unfinished and has these settings (a resumed
    job keeps one run id); with `reuse_finished` (the caller knows that run finished: its output
    holds its model), the latest of the same name and settings, finished or not, so that a rerun
    after a crash between its last steps makes no second run. Else start one (an unfinished run of
    other settings is marked KILLED: it is not resumed)."""
    mlflow = _mlflow()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=_artifact_location(uri))
    wanted = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    if reuse_finished and settings:
        wanted += f" and tags.`{SETTINGS_TAG}` = '{settings}'"
    found = client.search_runs([exp_id], filter_string=wanted, max_results=1,
                               order_by=["attributes.start_time DESC"])
    logged = [mlflow.entities.Param(k, redact(str(v))[:500]) for k, v in sorted(params.items())]
    if found and settings and found[0].data.tags.get(SETTINGS_TAG) == settings and (
            reuse_finished or found[0].info.status != "FINISHED"):
        if logged and not found[0].data.params:  # a crash between its creation and its params
            client.log_batch(found[0].info.run_id, params=logged)
        return Tracker(uri, found[0].info.run_id)
    if found and found[0].info.status == "RUNNING":
        client.set_terminated(found[0].info.run_id, "KILLED")
    tags = {RUN_NAME_TAG: run_name, **({SETTINGS_TAG: settings} if settings else {})}
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    crashpoints.wrote("mlflow: run created")
    client.log_batch(run.info.run_id, params=logged)  # one batch: all of them, or none
    return Tracker(uri, run.info.run_id)


def finish_run(tracker: Tracker, model_dir: Path, artifacts: dict[str, Path], register: str | None,
               status: str = "FINISHED") -> str | None:
    """Log the model directory and artifacts (name -> a file or a folder); register a version
    when asked. Returns the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    if client.get_run(tracker.run_id).info.status != "FINISHED":  # a finished run holds them all
        client.log_artifacts(tracker.run_id, str(model_dir), artifact_path="model")
        for name, path in artifacts.items():  # a folder's files go under name/
            log = client.log_artifacts if Path(path).is_dir() else client.log_artifact
            log(tracker.run_id, str(path), artifact_path=name)
    version = register_run_model(register, tracker.run_id) if register else None
    client.set_terminated(tracker.run_id, status)
    crashpoints.wrote(f"mlflow: run {status.lower()}")
    return version


def _missing_store(uri: str) -> Path | None:
    """The file a SQLite tracking URI (``sqlite:///PATH``) names when it does not exist, else None:
    MLflow would create it on first touch."""
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    return db if db is not None and not db.is_file() else None


def _existing_store(ref: str) -> str:
    """The tracking URI to resolve ref in. MLflow creates a missing SQLite store on first touch
    (printing its migrations); an empty new store holds no model, so say so and create nothing."""
    uri = tracking_uri()
    db = _missing_store(uri)
    if db is None:
        return uri
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(f"model {ref!r} needs the MLflow registry but MLFLOW_TRACKING_URI is not "
                          f"set and there is no local store {str(db)!r}; set MLFLOW_TRACKING_URI")
    raise ConfigError(f"model {ref!r}: the registry at {storage.display(uri)} does not exist")


def download_model(ref: str, cache: Path) -> Path:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> a local model directory under cache."""
    _mlflow()
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_existing_store(ref))
    body = ref[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - unknown name/version/alias
        _raise_unless_absent(client, body.split("@", 1)[0] if "@" in body else body.rsplit("/", 1)[0], exc)
        raise ConfigError(f"model {ref!r} is not in the registry at {storage.display(tracking_uri())} "
                          f"({type(exc).__name__})") from None
    # NAME/VERSION is not unique across tracking stores (every new store starts at version 1):
    # the cache key includes where the version's files live and the run that made them.
    key = hashlib.sha1(f"{tracking_uri()}|{mv.run_id}|{mv.source}".encode()).hexdigest()[:12]
    target = Path(cache) / f"{name}-v{mv.version}-{key}"
    if not target.is_dir():  # renamed into place whole, so complete (a static model has no config.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            # the store this version came from, not a URI an earlier call left in mlflow's globals
            download_artifacts(artifact_uri=mv.source, dst_path=str(staging), tracking_uri=tracking_uri())
            (staging / "model").rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent download that won
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- registry: versions, aliases, tags


def _client():
    _mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


def alias_version(name: str, alias: str) -> str | None:
    """The version behind models:/NAME@ALIAS, or None when there is none."""
    client = _client()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # noqa: BLE001 - unknown model or alias
        _raise_unless_absent(client, name, exc)
        return None


def require_alias(name: str, alias: str) -> str:
    """The version behind models:/NAME@ALIAS, or a one-line ConfigError saying how to make one."""
    version = alias_version(name, alias)
    if version is None:
        raise ConfigError(f"model {name!r} has no @{alias} in the registry at "
                          f"{storage.display(tracking_uri())}; register one first: "
                          f"semvec register MODEL --name {name} --alias {alias}")
    return version


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, version)
    crashpoints.wrote(f"{name}@{alias} = v{version}")


def delete_alias(name: str, alias: str) -> None:
    _client().delete_registered_model_alias(name, alias)
    crashpoints.wrote(f"{name}@{alias} deleted")


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(_client().get_model_version(name, version).tags)


def versions_tagged(name: str, key: str, value: str) -> set[str]:
    """The versions of a registered model whose tag `key` is `value`, in one search (a version
    deleted since is simply not among them)."""
    found = _client().search_model_versions(f"name = '{name}'")
    return {str(v.version) for v in found if v.name == name and (v.tags or {}).get(key) == value}


def tag_version(name: str, version: str, key: str, value: str) -> None:
    _client().set_model_version_tag(name, version, key, redact(value))
    crashpoints.wrote(f"{name} v{version} tagged {key}")


def _register(client, name: str, source: str, run_id: str | None, tags: dict) -> str:
    try:
        client.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001 - not found: create it
        _create_model(client, name, exc)
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


def _create_model(client, name: str, lookup: BaseException) -> None:
    """Create NAME after its lookup failed. A server with authentication answers 403 to a lookup
    of a model the user has no grant on, whether it exists or not: the create tells which."""
    if _refused_request(lookup)[0] == 401:
        _raise_if_refused(lookup)
    try:
        client.create_registered_model(name)
    except Exception:
        _raise_if_refused(lookup)  # it exists and is not this user's: the 403 is the answer
        raise


def register_run_model(name: str, run_id: str, tags: dict | None = None) -> str:
    """The version of NAME from the model directory logged by run_id (artifact path ``model``):
    made once. A rerun after a crash that came after the registration finds it (tags set again)."""
    client = _client()
    tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
    made = _version_of_run(client, name, run_id)
    if made is not None:
        for k, v in tags.items():
            client.set_model_version_tag(name, made, k, v)
        return made
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = _register(client, name, source, run_id, tags)
    crashpoints.wrote(f"registered {name} v{version}")
    return version


def _version_of_run(client, name: str, run_id: str) -> str | None:
    """The first version of NAME registered from run_id, or None. By run id alone (a hex id; a
    name may hold quotes): any failure of the search is raised, never taken for "none yet"."""
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    return str(min(int(v.version) for v in found)) if found else None


def log_model_dir(experiment: str, run_name: str, model_dir: Path, params: dict) -> str:
    """A finished run holding model_dir as its ``model`` artifact; returns the run id."""
    tracker = start_run(experiment, run_name, params, settings=params.get("fingerprint"), reuse_finished=True)
    client = _client()
    if client.get_run(tracker.run_id).info.status != "FINISHED":  # the same files, logged before
        client.log_artifacts(tracker.run_id, str(model_dir), artifact_path="model")
        client.set_terminated(tracker.run_id, "FINISHED")
    return tracker.run_id


def log_result(run_id: str, metrics: dict, tags: dict) -> None:
    """Metrics (at step 0) and tags on a run, in one batch, once; tag values pass through redact."""
    from mlflow.entities import Metric, RunTag

    client = _client()
    tags = {k: redact(str(v)) for k, v in tags.items()}
    held = client.get_run(run_id).data.tags
    if tags and all(held.get(k) == v for k, v in tags.items()):  # logged before (one batch): not twice
        return
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
