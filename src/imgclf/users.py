"""`make mlflow-user`: add a user to the team tracking server and grant them this project.

    python -m imgclf.users USERNAME [--permission READ|EDIT|MANAGE|NO_PERMISSIONS]

Run by an admin: MLFLOW_TRACKING_URI names the server, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) the admin's account. The new user's
password comes from MLFLOW_NEW_USER_PASSWORD, else it is asked for (never echoed, never
printed). A user that exists keeps their password and gets the new permission.

The permission applies to the project's experiment and registered model (`mlflow.experiment`
and `mlflow.registered_name` in params.yaml): READ lets them browse runs and load
`models:/<name>@champion`; EDIT lets them run the pipeline (log runs, register versions, move
the champion alias); MANAGE also lets them grant others. The experiment is created when it does
not exist yet, so it has an id to grant on; a registered model can be granted before it exists.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import Any

from imgclf import cli, tracking
from imgclf.config import MlflowConfig, load_section, read_params
from imgclf.errors import ConfigError, TrackingError

log = logging.getLogger("mlflow-user")

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
MIN_PASSWORD = 12  # the server script's rule for the admin, applied to everyone


def _new_password(username: str) -> str:
    password = os.environ.get("MLFLOW_NEW_USER_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise ConfigError(f"no password for new user {username!r}: set MLFLOW_NEW_USER_PASSWORD "
                              "or run this in a terminal to be asked for it")
        password = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ; run it again")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password for {username!r} has {len(password)} characters: "
                          f"it needs at least {MIN_PASSWORD}")
    return password


def _set_permission(client: Any, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an earlier grant (the server refuses a second grant on the same resource)."""
    from mlflow.exceptions import MlflowException

    try:
        client.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, resource_type, resource_id)
        client.grant_user_permission(username, resource_type, resource_id, permission)


def grant(username: str, permission: str, uri: str, cfg: MlflowConfig) -> str:
    """Create `username` if needed, grant `permission` on the experiment and registered model;
    return what was done, in words."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    tracking.check_reachable(uri)  # unreachable, untrusted TLS, or wrong admin password: one line
    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        try:
            client.get_user(username)
            created = False
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_user(username, _new_password(username))
            created = True
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(cfg.experiment)
        _set_permission(client, username, "experiment", experiment_id, permission)
        _set_permission(client, username, "registered_model", cfg.registered_name, permission)
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking server {tracking.masked(uri)}: {exc.message}") from None
    what = "created with" if created else "now has"
    return (f"user {username!r} {what} {permission} on experiment {cfg.experiment!r} (id {experiment_id}) "
            f"and registered model {cfg.registered_name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make mlflow-user", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("username")
    parser.add_argument("--permission", default="READ", choices=PERMISSIONS, type=str.upper)
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"MLFLOW_TRACKING_URI: got {uri!r}: set it to the team server, e.g. https://mlflow.example.org:5000")
    cfg = load_section("mlflow", MlflowConfig, read_params())
    log.info("%s", grant(args.username, args.permission, uri, cfg))


if __name__ == "__main__":
    cli.run(main)
