"""MLflow: where runs go, how they are tagged, and how later stages find them again.

Run ids never enter DVC-tracked outputs (they differ on every run and would make identical
results look changed). A run is found by the SHA-256 of the model file it produced, which is
a pure function of code, params and data, so evaluate and report can attach to it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.dvcfiles import LockError, locked_outputs
from imgclf.errors import TrackingError
from imgclf.paths import ROOT, home_root
from imgclf.redact import masked

if TYPE_CHECKING:  # mlflow takes seconds to import: only stages that log pay for it
    from mlflow.entities import Run

log = logging.getLogger(__name__)

def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store (an absolute path, so queued
    `dvc exp run`s executing in a temporary copy still write to the one database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home_root() / 'mlflow.db'}"


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialize opening a SQLite store across processes.

    Once a store exists, concurrent writers are fine (MLflow sets SQLite's busy timeout to
    20 s, so a writer waits for another's lock). But the first process to open a new store
    creates its tables (alembic migrations) and the experiment, and two doing that at once
    (queued experiments on a fresh project) fail with "table already exists" or a duplicate
    experiment. An exclusive lock on the database's directory makes the second wait until
    the first is done; it then finds everything in place. The directory, not a lock file:
    nothing to clean up or git-ignore; and not the database file, whose locks are SQLite's.
    """
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        yield
        return
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without flock (some network mounts): go on unlocked
            log.debug("cannot lock %s (%s); opening the store without it", directory, exc)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# Which permissions let a user write: log runs to an experiment, register versions of a model
# and move its aliases (MLflow's basic-auth app; READ and USE only look).
_WRITE_PERMISSIONS = frozenset({"EDIT", "MANAGE"})
_ACCOUNT_HELP = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) "
                 "to your account on it")


def _credentials(uri: str) -> tuple[str, Any, str | None, str | None]:
    """The server's URI without user info, MLflow's host credentials for it (TLS settings
    included), and the user name and password a request will carry."""
    import urllib.parse

    from mlflow.utils.credentials import get_default_host_creds

    parsed = urllib.parse.urlsplit(uri)
    # Credentials in the URI itself (http://user:password@host) count when the environment
    # and ~/.mlflow/credentials give none, as they do for the requests library MLflow uses.
    bare = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/")
    creds = get_default_host_creds(bare)
    username = creds.username or (urllib.parse.unquote(parsed.username) if parsed.username else None)
    password = creds.password or (urllib.parse.unquote(parsed.password) if parsed.password else None)
    return bare, creds, username, password


def _origin(url: str) -> tuple[str, str | None, int | None]:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _SameOriginCredentials(urllib.request.HTTPRedirectHandler):
    """Follow a redirect, but with the Basic-auth header only to the same scheme, host and
    port: urllib copies every header to wherever a redirect points, so a server (or anyone who
    can answer for it) could otherwise send the password on to a host of its choosing."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _server_request(uri: str, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET `path` from the tracking server with the credentials and TLS settings MLflow itself
    would use; return the HTTP status and the decoded JSON body (None when there is none).

    One attempt, ten seconds: MLflow's own client retries for minutes before it gives up.
    """
    import json
    import ssl
    import urllib.parse

    bare, creds, username, password = _credentials(uri)
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(f"{bare}{path}{query}")
    if username and password:
        import base64

        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = None
    if bare.startswith("https:"):
        # MLFLOW_TRACKING_SERVER_CERT_PATH: the team's private CA; MLFLOW_TRACKING_INSECURE_TLS
        # turns verification off, as it does for MLflow's client.
        context = ssl.create_default_context(cafile=creds.server_cert_path)
        if creds.ignore_tls_verification:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _SameOriginCredentials)
    try:
        with opener.open(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def _failure(exc: BaseException) -> str:
    """Why a connection failed, in a few words (urllib wraps the real reason)."""
    import ssl

    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message}"
    return str(reason)


def check_reachable(uri: str, experiment: str | None = None, registered_model: str | None = None) -> None:
    """For an HTTP tracking server, fail now, in one line, if it cannot be used: it does not
    answer, its TLS certificate is not trusted, it refuses the credentials (401), or the user
    may not write to `experiment` or to the registered model `registered_model` (403).

    Read-only callers (imgclf-predict) pass neither name. The permission probes are the auth
    app's own read-only endpoints (who am I; what may I do with this resource), so nothing is
    created or changed on the server by checking.
    """
    if not uri.startswith(("http://", "https://")):
        return
    shown = masked(uri)
    try:
        _server_request(uri, "/health")  # answered without credentials
        status, me = _server_request(uri, "/api/2.0/mlflow/users/current")
    except (urllib.error.URLError, OSError) as exc:
        reason = _failure(exc)
        if reason.startswith("TLS"):
            raise TrackingError(
                f"MLflow tracking server {shown}: {reason}; set MLFLOW_TRACKING_SERVER_CERT_PATH to the "
                "certificate of the CA that signed the server's (see docs/mlflow.md)") from None
        raise TrackingError(
            f"MLflow tracking server {shown} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
        ) from None
    if status == 401:
        username = _credentials(uri)[2]
        whose = f"refused the credentials of user {username!r}" if username else "needs a user name and password"
        raise TrackingError(f"MLflow tracking server {shown} {whose} (401 unauthorized); {_ACCOUNT_HELP}")
    if status == 403:  # before authentication: MLflow's check of the Host header (DNS rebinding)
        raise TrackingError(f"MLflow tracking server {shown} refused the request (403 forbidden): its "
                            "--allowed-hosts must include the host and port of MLFLOW_TRACKING_URI")
    if status == 404 or not isinstance(me, dict) or "user" not in me:
        return  # a server without authentication (MLFLOW_AUTH=off on loopback): anyone may write
    user = me["user"]
    if not user.get("is_admin"):
        _check_may_write(uri, str(user.get("username")), experiment, registered_model)


def _check_may_write(uri: str, name: str, experiment: str | None, registered_model: str | None) -> None:
    """A TrackingError unless user `name` may write to `experiment` and `registered_model`."""
    shown = masked(uri)

    def refuse(what: str, permission: str) -> TrackingError:
        return TrackingError(
            f"MLflow tracking server {shown}: user {name!r} may not write to {what} (403, has {permission}, "
            f"needs EDIT); ask an admin for it: make mlflow-user MLFLOW_USER={name} PERMISSION=EDIT")

    def permission(resource_type: str, resource_id: str) -> str:
        status, answer = _server_request(uri, "/api/3.0/mlflow/users/permissions/get",
                                         {"username": name, "resource_type": resource_type,
                                          "resource_id": resource_id})
        return str(answer.get("permission")) if status == 200 and isinstance(answer, dict) else "NO_PERMISSIONS"

    if experiment is not None:
        status, found = _server_request(uri, "/api/2.0/mlflow/experiments/get-by-name",
                                        {"experiment_name": experiment})
        if status == 403:
            raise refuse(f"experiment {experiment!r}", "no access")
        # 404: the experiment does not exist yet; any user may create it (and then owns it).
        if status == 200 and isinstance(found, dict):
            granted = permission("experiment", str(found["experiment"]["experiment_id"]))
            if granted not in _WRITE_PERMISSIONS:
                raise refuse(f"experiment {experiment!r}", granted)
    if registered_model is not None:
        granted = permission("registered_model", registered_model)
        # No grant at all is not a refusal: the server answers 403 for a model that does not
        # exist yet just as for one the user may not see, and whoever registers a new model
        # owns it. An existing one would then fail at registration, in one line.
        if granted not in _WRITE_PERMISSIONS | {"NO_PERMISSIONS"}:
            raise refuse(f"registered model {registered_model!r}", granted)


# What this experiment is, in MLflow's own terms: its "Machine learning" kind, not GenAI. The
# 3.17 UI files every experiment under a per-browser switch instead (GenAI until the person picks
# "Model training"), so the address that opens the runs table is `runs_page`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def runs_page(ui: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the MLflow UI at `ui`, in its model-training
    view whatever the browser's GenAI/Model training switch says."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_store(store: str, holds: str) -> None:
    """For commands that only read: fail in one line, and fast, where MLflow would create an
    empty SQLite store or retry an unreachable server for minutes."""
    if store.startswith("sqlite:///"):
        database = Path(store.removeprefix("sqlite:///").split("?", 1)[0])
        if not database.is_file():
            raise TrackingError(f"no MLflow store at {database}: run `dvc repro` first, or set "
                                f"MLFLOW_TRACKING_URI to the store that holds {holds}")
    check_reachable(store)


def setup(experiment: str, registered_model: str | None = None) -> str:
    """Point MLflow at the store, check that this user may log to `experiment` (and register
    versions of `registered_model`, when given), and return the experiment id. The experiment
    is created (or marked, if someone created it bare) as model training."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    check_reachable(uri, experiment, registered_model)
    mlflow.set_tracking_uri(uri)
    with _first_use_lock(uri):
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            for key, value in EXPERIMENT_KIND.items():
                if found.tags.get(key) != value:
                    mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:"):
            # Keep artifacts next to the database rather than relative to whatever the CWD is.
            location = (home_root() / "mlartifacts").as_uri()
        try:
            return mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException as exc:
            # A server is shared: another pipeline may have created it since we looked.
            again = mlflow.get_experiment_by_name(experiment) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if again is None:
                raise
            return again.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


# What makes a model besides its data: a change here that is not committed is not in `git_commit`.
# (Not the whole tree: dvc.lock and the git-tracked metrics change while the pipeline runs.)
SOURCE_PATHS = ("src", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock")


def git_clean() -> str:
    """"true" when the code and params are as `git_commit` has them, "false" when not, else "unknown"."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
                             cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return "false" if out.stdout.strip() else "true"


def data_version(output: str = "data/processed") -> str:
    """The DVC hash of an output as dvc.lock records it (what `dvc pull` would fetch)."""
    try:
        locked = locked_outputs(ROOT).get(output)
    except LockError:
        return "unknown"
    return locked.md5 if locked else "unknown"


def provenance_tags(model_name: str, stage: str) -> dict[str, str]:
    tags = {
        "model_name": model_name,
        "dvc_stage": stage,
        "git_commit": git_commit(),
        "git_clean": git_clean(),
        "data_version": data_version(),
    }
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc_exp_name"] = exp
    return tags


def file_sha256(path: Path) -> str:
    """The key that links a model file to its MLflow run (tag `model_sha256`)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    """The hash DVC records for a file output in dvc.lock."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_run(experiment_id: str, model_sha256: str) -> Run | None:
    """The newest run whose model file has this hash, or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.model_sha256 = '{model_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


@contextmanager
def resume_run(experiment_id: str, model_sha256: str, model_name: str, stage: str) -> Iterator[str]:
    """Reopen the run that trained this model file; start a tagged one if there is none
    (the model came from DVC's cache or a teammate's remote, so no local run exists).
    Reopening moves the run's end time (and so its duration in the UI) to now: only for
    what must run inside an active run (logging a model); add metrics and files to a
    finished run with `MlflowClient` and its run id instead."""
    import mlflow

    run = find_run(experiment_id, model_sha256)
    if run is None:
        log.warning("no MLflow run has model_sha256=%s; starting a new run for %s", model_sha256[:12], model_name)
        tags = {**provenance_tags(model_name, stage), "model_sha256": model_sha256}
        with mlflow.start_run(experiment_id=experiment_id, run_name=model_name, tags=tags) as active:
            yield active.info.run_id
        return
    with mlflow.start_run(run_id=run.info.run_id) as active:
        yield active.info.run_id


def main() -> None:
    """`python -m imgclf.tracking --ui URL`: where the project's runs are in the UI at URL (make mlflow-ui)."""
    import argparse

    import mlflow

    from imgclf.config import MlflowConfig, load_section

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ui", required=True, help="the UI's base address, e.g. http://127.0.0.1:5000")
    ui = parser.parse_args().ui
    name = load_section("mlflow", MlflowConfig).experiment
    uri, found = tracking_uri(), None
    # Looking into a SQLite store that is not there would create it: nothing to find anyway.
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///").split("?")[0]).exists():
        mlflow.set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(name)
    if found is None:
        print(f"MLflow UI: {ui} (no runs in {name!r} yet: `dvc repro` logs them)")
    else:
        print(f"MLflow UI: {runs_page(ui, found.experiment_id)}  (the runs of {name!r})")


if __name__ == "__main__":
    from imgclf import cli

    cli.run(main)
