"""The team tracking server for tests: scripts/mlflow_server.sh on a throwaway PostgreSQL, on a
free loopback port, with an admin whose password is made at run time, optionally over HTTPS
with a throwaway CA, and users added the way `make mlflow-user` adds them.
"""

from __future__ import annotations

import gc
import os
import secrets
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fixtures import BIN, ROOT, stop_session, wait_until_serving
from imgclf.cli import NO_TELEMETRY
from pgserver import PgServer, free_port
from tlscerts import make_certificates

SCRIPT = ROOT / "scripts" / "mlflow_server.sh"


def new_secret() -> str:
    """A password made at run time (the credential scan of tracked files stays clean)."""
    return secrets.token_urlsafe(18)


def script_env(**extra: str) -> dict[str, str]:
    """This environment without any MLFLOW_ setting, the venv first on PATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **NO_TELEMETRY, **extra)
    return env


@dataclass
class TeamServer:
    url: str
    artifacts: Path
    log: Path
    pg: PgServer
    ca: Path | None  # the CA that signed the server's certificate; None over plain HTTP
    cert: Path | None  # the server's certificate; None over plain HTTP
    admin: tuple[str, str]
    proc: subprocess.Popen
    users: dict[str, str] = field(default_factory=dict)  # user name -> password

    def env(self, user: str, **extra: str) -> dict[str, str]:
        """What a client of this server sets: its URI, the CA, and `user`'s credentials."""
        password = self.admin[1] if user == self.admin[0] else self.users[user]
        env = {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
        if self.ca is not None:
            env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(self.ca)
        return {**env, **extra}

    def add_user(self, user: str, permission: str) -> None:
        """What `make mlflow-user MLFLOW_USER=<user> PERMISSION=<permission>` runs, as the admin,
        for the experiment and registered model of this checkout's params.yaml."""
        self.users[user] = new_secret()
        env = {**script_env(PYTHONPATH=str(ROOT / "src")), **self.env(self.admin[0]),
               "MLFLOW_NEW_USER_PASSWORD": self.users[user]}
        proc = subprocess.run([str(BIN / "python"), "-m", "imgclf.users", user, "--permission", permission],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or f"user '{user}' created with {permission}" not in proc.stderr:
            raise AssertionError(f"adding {user} failed ({proc.returncode}):\n{proc.stderr}")

    def stop(self) -> None:
        _drop_mlflow_connections()
        stop_session(self.proc)


def _drop_mlflow_connections() -> None:
    """Close the HTTP connections this test process's MLflow clients keep open. The server waits
    up to its graceful-shutdown timeout (10 s, scripts/mlflow_server.sh) for a kept-alive HTTPS
    connection to close: measured, a stop took 11.5 s with one open and 1.4 s without. MLflow
    caches one requests session per client configuration; once the cache lets go of them they
    are garbage, and collecting them closes their sockets."""
    request_utils = sys.modules.get("mlflow.utils.request_utils")  # never imported: nothing to close
    cached = getattr(request_utils, "_cached_get_request_session", None)
    if cached is not None:
        cached.cache_clear()
        gc.collect()


def start_team_server(pg: PgServer, work: Path, request, *, tls: bool, users: dict[str, str],
                      extra: dict[str, str] | None = None) -> TeamServer:
    """Start the script's server, stopped by a finalizer of the pytest `request`, and add
    `users` (name -> permission) the way `make mlflow-user` does. `extra`: more of the server's
    environment (an S3 artifact store, say)."""
    certs = make_certificates(work / "tls") if tls else None
    port = free_port()
    admin = ("admin", new_secret())
    env = script_env(MLFLOW_BACKEND_STORE_URI=pg.uri, MLFLOW_ARTIFACTS_DESTINATION=str(work / "artifacts"),
                     MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_AUTH_ADMIN_USERNAME=admin[0],
                     MLFLOW_AUTH_ADMIN_PASSWORD=admin[1], MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
    env.update(extra or {})
    if certs is not None:
        env.update(MLFLOW_TLS_CERTFILE=str(certs.cert), MLFLOW_TLS_KEYFILE=str(certs.key))
    log = work / "server.log"
    with log.open("wb") as out:
        # One worker: the tests are its only client, and the machine has few cores to spare.
        proc = subprocess.Popen([str(SCRIPT), "--workers", "1"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    server = TeamServer(url=url, artifacts=work / "artifacts", log=log, pg=pg, ca=certs.ca if certs else None,
                        cert=certs.cert if certs else None, admin=admin, proc=proc)
    request.addfinalizer(server.stop)
    context = ssl.create_default_context(cafile=str(server.ca)) if server.ca is not None else None
    wait_until_serving(proc, url, log, context=context)
    for user, permission in users.items():
        server.add_user(user, permission)
    return server
