"""MLflow's basic-auth app for semvec: its config file, its two users and their grants, a login check.

    python infra/mlflow_auth.py ini PATH      write basic_auth.ini for `mlflow server --app-name basic-auth`
    python infra/mlflow_auth.py users         as the admin: create (or update) the reader and the writer
                                              and grant them the models and experiments below
    python infra/mlflow_auth.py check NAME    as MLFLOW_TRACKING_USERNAME: NAME@champion resolves

Kubernetes runs these (infra/k8s/mlflow.yaml, mlflow-users.yaml, cronjob-retrain.yaml) with every
credential in the environment from a Secret; nothing here prints one. The ini holds the database URI
(with the Postgres password): written with mode 0600 to a memory-backed emptyDir, never logged. The
admin's password is not in it: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD itself.

Roles (README, "MLflow users and roles"). The server's default permission is NO_PERMISSIONS, so a
user sees only what is granted:
  reader  READ on the registered models and semvec's experiments: resolves models:/NAME@ALIAS and
          downloads the model (backfills, the retrain submitter's check); changes nothing.
  writer  EDIT on the experiments, MANAGE on the models: logs runs, registers versions, moves and
          deletes @champion / @previous, tags versions (training, retraining, `semvec register`,
          `semvec rollback`).
Settings (environment): MLFLOW_TRACKING_URI; for `users` the admin as MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, SEMVEC_MLFLOW_{READER,WRITER}_{USERNAME,PASSWORD}, SEMVEC_MLFLOW_MODELS
(comma-separated, default semvec-sts) and SEMVEC_MLFLOW_EXPERIMENTS (default semvec,semvec-retrain).
Errors are one line (`semvec: error: ...`, exit 2 for a bad setting or a refused login).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from semvec import storage, tracking
from semvec.cli import run_guarded
from semvec.errors import ConfigError
from semvec.redact import setup_logging

# MANAGE on the models for the writer: `semvec rollback` deletes @previous, which MLflow counts as a
# delete. It also lets the writer delete those models and grant others on them: name only its own.
ROLES = {"reader": {"registered_model": "READ", "experiment": "READ"},
         "writer": {"registered_model": "MANAGE", "experiment": "EDIT"}}
DEFAULT_MODELS = "semvec-sts"
DEFAULT_EXPERIMENTS = "semvec,semvec-retrain"  # semvec train / register, semvec retrain


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


def _names(variable: str, default: str) -> list[str]:
    names = [n.strip() for n in os.environ.get(variable, default).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{variable} names nothing; give comma-separated names")
    return names


def write_ini(path: Path) -> dict:
    """basic_auth.ini: users and grants in the tracking database (its own tables beside MLflow's),
    nothing visible without a grant. The admin comes from MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD."""
    uri = _env("MLFLOW_AUTH_DATABASE_URI", os.environ.get("MLFLOW_BACKEND_STORE_URI"))
    text = ("[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {uri.replace('%', '%%')}\n"  # configparser reads % as interpolation
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return {"ini": str(path), "database": storage.display(uri)}


def _user(role: str) -> tuple[str, str]:
    prefix = f"SEMVEC_MLFLOW_{role.upper()}"
    return _env(f"{prefix}_USERNAME"), _env(f"{prefix}_PASSWORD")


def _ensure_user(auth, username: str, password: str) -> str:
    """Create the user, or set its password to the Secret's (so rotating is: edit, rerun)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(username, password)
        return "created"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    auth.update_user_password(username, password)
    return "password updated"


def _grant(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an earlier grant on the same resource (so a rerun sets the role's level)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def _experiment_ids(names: list[str]) -> dict[str, str]:
    """Each experiment's id, made by the admin when missing: grants on experiments go by id."""
    from mlflow.tracking import MlflowClient

    client, ids = MlflowClient(tracking.tracking_uri()), {}
    for name in names:
        found = client.get_experiment_by_name(name)
        ids[name] = found.experiment_id if found else client.create_experiment(name)
    return ids


def setup_users() -> dict:
    """The reader and the writer, each with its permission on every model and experiment."""
    from mlflow.server import get_app_client

    models = _names("SEMVEC_MLFLOW_MODELS", DEFAULT_MODELS)
    experiments = _experiment_ids(_names("SEMVEC_MLFLOW_EXPERIMENTS", DEFAULT_EXPERIMENTS))
    with warnings.catch_warnings():  # loading the auth client warns of a Starlette deprecation
        warnings.simplefilter("ignore")
        auth = get_app_client("basic-auth", tracking_uri=_env("MLFLOW_TRACKING_URI"))
    users = {}
    for role, permission in ROLES.items():
        username, password = _user(role)
        done = _ensure_user(auth, username, password)
        for model in models:
            _grant(auth, username, "registered_model", model, permission["registered_model"])
        for exp_id in experiments.values():
            _grant(auth, username, "experiment", exp_id, permission["experiment"])
        users[role] = {"username": username, "user": done, **permission}
    return {"users": users, "registered_models": models, "experiments": sorted(experiments)}


def check_alias(name: str, alias: str) -> dict:
    """The login works and NAME@ALIAS exists: a night with no champion fails here, in seconds."""
    return {"model": name, "alias": alias, "version": tracking.require_alias(name, alias)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ini", help="write basic_auth.ini").add_argument("path", type=Path)
    sub.add_parser("users", help="create or update the reader and the writer, with their grants")
    check = sub.add_parser("check", help="NAME@ALIAS resolves with this login")
    check.add_argument("name")
    check.add_argument("--alias", default="champion", help="(default: champion)")
    args = parser.parse_args(argv)
    setup_logging(False)
    jobs = {"ini": lambda: write_ini(args.path), "users": setup_users,
            "check": lambda: check_alias(args.name, args.alias)}
    code, summary = run_guarded(jobs[args.command], verbose=False)
    if code == 0:
        print(f"semvec mlflow-auth {args.command}: {summary}")
    return code


if __name__ == "__main__":
    sys.exit(main())
