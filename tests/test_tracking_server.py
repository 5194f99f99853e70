"""The team tracking server: scripts/mlflow_server.sh on a throwaway PostgreSQL, over HTTPS
with a throwaway CA, every request authenticated; the tiny pipeline logging to it as a user
allowed to EDIT, and everything read back through the server; a READ user who may look and
load the champion but not write; two queued experiments logging to it at once; the train stage
refusing to start, in one line, when the server would not take its runs; and the script
refusing set-ups that would expose the server."""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from dvcqueue import EXPERIMENT, check_experiment_runs, run_queued
from fixtures import BIN, ONE_MODEL, ROOT, TINY, tiny_project
from imgclf import tracking
from imgclf.errors import TrackingError
from imgclf.registry import ACCURACY_TAG, CHAMPION
from pgserver import SUPERUSER, free_port
from teamserver import SCRIPT, TeamServer, new_secret, script_env, start_team_server

REGISTERED = "fashion-mnist-classifier"


def _auth_env(**extra: str) -> dict[str, str]:
    """What the script needs to start an authenticated server, besides the database."""
    return script_env(MLFLOW_AUTH_ADMIN_PASSWORD=new_secret(), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
                       **extra)


@pytest.fixture
def fake_mlflow(tmp_path):
    """A stand-in `mlflow` that prints its arguments, the auth config's mode and text, and the
    config's path last (next to the real interpreter, which the script asks about drivers)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n'
                                 'echo "env MLFLOW_BACKEND_STORE_URI=$MLFLOW_BACKEND_STORE_URI"\n'
                                 'if [ -n "$MLFLOW_AUTH_CONFIG_PATH" ]; then\n'
                                 '  stat -c "mode %a" "$MLFLOW_AUTH_CONFIG_PATH"; cat "$MLFLOW_AUTH_CONFIG_PATH"\n'
                                 '  echo "$MLFLOW_AUTH_CONFIG_PATH"\nfi\n')
    (fake / "mlflow").chmod(0o755)
    # A wrapper, not a symlink: a symlinked venv interpreter would not find the venv's packages.
    (fake / "python").write_text(f'#!/bin/sh\nexec "{BIN / "python"}" "$@"\n')
    (fake / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()

    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        env = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"}
        return subprocess.run([str(SCRIPT), *args], cwd=work, env=env, capture_output=True, text=True, timeout=60)

    run.work = work
    return run


def test_server_script_needs_a_backend_store_uri(tmp_path):
    proc = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: MLFLOW_BACKEND_STORE_URI is not set; set it to the team database, "
        "e.g. postgresql://user:password@host:5432/mlflow"]
    assert list(tmp_path.iterdir()) == []  # it stopped before creating the artifact directory


def test_server_script_serves_basic_auth_with_a_private_config(fake_mlflow):
    """What the script hands to `mlflow server`: the basic-auth app, allowed hosts for the
    loopback port, the database (driver named) in the environment and never in argv, where `ps`
    shows it to every local user, and a 0600 auth config naming the runs' own database, removed
    when the server exits; the database password never in its output."""
    login = "team:" + new_secret()
    env = _auth_env(MLFLOW_BACKEND_STORE_URI=f"postgresql://{login}@db.example.org:5432/mlflow")
    proc = fake_mlflow(env, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    backend = f"postgresql+psycopg2://{login}@db.example.org:5432/mlflow"  # psycopg 3 is not installed
    out = proc.stdout.splitlines()
    work = fake_mlflow.work
    assert out[:15] == [
        "server", "--serve-artifacts",
        "--artifacts-destination", str(work / "mlartifacts-server"),
        "--host", "127.0.0.1", "--port", "5000",
        "--allowed-hosts", "127.0.0.1:5000,localhost:5000,[::1]:5000",
        "--uvicorn-opts", "--timeout-graceful-shutdown 10", "--app-name", "basic-auth", "--workers"]
    assert out[15:18] == ["2", f"env MLFLOW_BACKEND_STORE_URI={backend}", "mode 600"]
    assert not any(login.split(":")[1] in arg for arg in out[:16])
    assert "default_permission = NO_PERMISSIONS" in out and f"database_uri = {backend}" in out
    config = Path(out[-1])
    assert not config.is_relative_to(ROOT) and not config.exists()  # outside the checkout, gone after
    assert (work / "mlartifacts-server").is_dir()
    assert login.split(":")[1] not in proc.stderr and "postgresql+psycopg2://***@db.example.org" in proc.stderr


def test_server_script_without_auth_only_on_loopback(fake_mlflow, tmp_path):
    db = f"postgresql://{SUPERUSER}@127.0.0.1:5432/mlflow"
    proc = fake_mlflow(script_env(MLFLOW_BACKEND_STORE_URI=db, MLFLOW_AUTH="off", MLFLOW_PORT="5001"))
    assert proc.returncode == 0, proc.stderr
    assert "--app-name" not in proc.stdout.splitlines() and "mode" not in proc.stdout
    assert "authentication off" in proc.stderr


SHORT = "x" * 11


@pytest.mark.parametrize("env, message", [
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set; set it to the admin's password, "
                                          "at least 12 characters (or MLFLOW_AUTH=off, loopback only)"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": SHORT}, "MLFLOW_AUTH_ADMIN_PASSWORD is too short (11 characters); set it to the "
                                            "admin's password, at least 12 characters (or MLFLOW_AUTH=off, loopback only)"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY is not set; set it to at least 32 random "
                                             "characters, e.g. $(python3 -c 'import secrets; print(secrets.token_hex(32))')"),
    ({"MLFLOW_AUTH": "off", "MLFLOW_HOST": "192.0.2.7"},
     "MLFLOW_AUTH=off is only allowed on loopback (MLFLOW_HOST=127.0.0.1), got MLFLOW_HOST=192.0.2.7"),
    ({"MLFLOW_HOST": "192.0.2.7"},
     "MLFLOW_HOST=192.0.2.7 is not loopback: set MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE (basic auth sends "
     "passwords with every request), or bind to 127.0.0.1 behind a TLS proxy"),
    ({"MLFLOW_TLS_CERTFILE": "/nonexistent.pem", "MLFLOW_TLS_KEYFILE": "/nonexistent.pem"},
     "MLFLOW_TLS_CERTFILE: got '/nonexistent.pem': must name a readable PEM file "
     "(set both MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE)"),
], ids=["no admin password", "short admin password", "no secret key", "no auth off loopback",
        "no TLS off loopback", "missing certificate"])
def test_server_script_refuses_an_unsafe_setup_in_one_line(fake_mlflow, env, message):
    base = _auth_env(MLFLOW_BACKEND_STORE_URI=f"postgresql://{SUPERUSER}@127.0.0.1:5432/mlflow")
    proc = fake_mlflow({**base, **env})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {message}"]
    assert proc.stdout == ""  # mlflow never started


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory, request):
    """The script's server over HTTPS with a throwaway CA; users in PostgreSQL: the admin, an
    editor (EDIT) and a reader (READ), added the way `make mlflow-user` adds them."""
    return start_team_server(postgres, tmp_path_factory.mktemp("server"), request, tls=True,
                             users={"editor": "EDIT", "reader": "READ"})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny project (the CNN alone) whose data is downloaded and split, nothing trained yet
    (until `served_run`)."""
    with tiny_project(tmp_path_factory.mktemp("served"), models=ONE_MODEL) as proj:
        proj.run("dvc", "repro", "preprocess")
        yield proj


@pytest.fixture(scope="module")
def served_run(prepared, server):
    """The whole tiny pipeline, logging to the team server as the editor; `ran`: its stages."""
    prepared.env.update(server.env("editor"))
    prepared.ran = prepared.repro()
    return prepared


@dataclass(frozen=True)
class QueuedRuns:
    experiments: dict[str, float]  # DVC experiment name -> its train.lr
    before: set[str]  # the run ids on the server before the experiments ran


@pytest.fixture(scope="module")
def queued_runs(served_run, server):
    """Two experiments (train.lr 0.03 and 0.04) queued from the committed project and run at
    once (`dvc queue start -j 2`), both logging to the team server as the editor."""
    from mlflow import MlflowClient

    served_run.run("git", "add", "-A")
    served_run.run("git", "commit", "-qm", "tiny pipeline trained against the server")
    client = MlflowClient(tracking_uri=server.url)
    # The client reads the CA and the editor's credentials from the environment.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.env("editor").items():
            patch.setenv(key, value)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    return QueuedRuns(run_queued(served_run, ("0.03", "0.04")), before)


def _train_refused(prepared, env: dict[str, str]) -> str:
    """Run the train stage with `env`; check it stopped before training; return its last line."""
    assert not (prepared.path / "models/cnn/model.pt").exists()
    clean = {k: v for k, v in prepared.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.run(["python", "stages/train.py", "cnn"], cwd=prepared.path, capture_output=True, text=True,
                          env={**clean, **env}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (prepared.path / "models/cnn/model.pt").exists()
    assert not (prepared.path / "metrics/cnn").exists()
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_unreachable_tracking_server_stops_training_before_it_starts(prepared):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    last = _train_refused(prepared, {"MLFLOW_TRACKING_URI": uri})
    assert last.startswith("error: MLflow tracking server ") and uri in last, last


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong password", "no CA certificate", "read-only user"])
def test_a_server_that_would_refuse_the_run_stops_training_before_it_starts(prepared, server, case):
    """One line each, naming the server (password masked) and what to do, before any training."""
    if case == "wrong password":
        env = server.env("editor", MLFLOW_TRACKING_PASSWORD=new_secret())
        expected = (f"error: MLflow tracking server {server.url} refused the credentials of user 'editor' "
                    "(401 unauthorized); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                    "(or ~/.mlflow/credentials) to your account on it")
    elif case == "no CA certificate":
        env = {k: v for k, v in server.env("editor").items() if k != "MLFLOW_TRACKING_SERVER_CERT_PATH"}
        expected = (f"error: MLflow tracking server {server.url}: TLS certificate not trusted: unable to get local "
                    "issuer certificate; set MLFLOW_TRACKING_SERVER_CERT_PATH to the certificate of the CA that "
                    "signed the server's (see docs/mlflow.md)")
    else:
        env = server.env("reader")
        expected = (f"error: MLflow tracking server {server.url}: user 'reader' may not write to experiment "
                    f"'{EXPERIMENT}' (403, has READ, needs EDIT); ask an admin for it: "
                    "make mlflow-user MLFLOW_USER=reader PERMISSION=EDIT")
    assert _train_refused(prepared, env) == expected


@pytest.mark.slow
def test_no_server_process_has_the_database_uri_in_its_argv(server):
    """`ps` shows every process's argv to every local user: the script's shell, mlflow and its
    uvicorn workers (all in the session the server was started in) carry the database URI in
    their environment, which only the owner and root can read, and never in argv."""
    database = f"127.0.0.1:{server.pg.port}/mlflow"
    argvs, environs = [], []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getsid(int(proc.name)) != server.proc.pid:
                continue
            argvs.append((proc / "cmdline").read_bytes().decode(errors="replace"))
            environs.append((proc / "environ").read_bytes().decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
    assert len(argvs) >= 2, argvs  # the script and the server at least
    assert [argv for argv in argvs if database in argv] == []
    assert any(database in env for env in environs)  # the check can see it where it is


@pytest.mark.slow
def test_password_in_the_uri_is_masked_in_the_refusal(server, monkeypatch):
    password = new_secret()
    host = server.url.removeprefix("https://")
    for key, value in server.env("editor").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(TrackingError) as info:
        tracking.check_reachable("https://" + ":".join(["editor", password]) + f"@{host}")
    assert str(info.value).startswith(f"MLflow tracking server https://***@{host} refused the credentials")
    assert password not in str(info.value)


def _request(server: TeamServer, path: str, auth: tuple[str, str] | None,
             host: str | None = None) -> tuple[int, Message, bytes]:
    """GET `path` as a browser would: basic auth when given, and the Host header when given."""
    request = urllib.request.Request(f"{server.url}{path}")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if host is not None:
        request.add_header("Host", host)
    context = ssl.create_default_context(cafile=str(server.ca))
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"


@pytest.mark.slow
@pytest.mark.parametrize("path", [SEARCH, "/"], ids=["REST", "UI"])
def test_requests_without_or_with_wrong_credentials_get_401(server, path):
    for auth in (None, ("editor", new_secret()), ("nobody", new_secret())):
        status, headers, _ = _request(server, path, auth)
        assert status == 401, (auth and auth[0], status)
        assert headers.get("WWW-Authenticate") == 'Basic realm="mlflow"'  # the browser asks for a login
    assert _request(server, path, ("editor", server.users["editor"]))[0] == 200


@pytest.mark.slow
def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 gets nothing,
    even from a browser that holds the credentials."""
    editor = ("editor", server.users["editor"])
    port = server.url.rsplit(":", 1)[1]
    status, _, body = _request(server, SEARCH, editor, host=f"evil.example:{port}")
    assert status == 403 and b"DNS rebinding" in body
    for name in ("127.0.0.1", "localhost"):
        assert _request(server, SEARCH, editor, host=f"{name}:{port}")[0] == 200


@pytest.fixture(scope="module")
def as_user():
    """Point the in-process MLflow client at the server as one of its users."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        # mlflow-artifacts:/ URIs resolve against the global tracking URI: point it at the server.
        previous = mlflow.get_tracking_uri()

        def login(server: TeamServer, user: str):
            from mlflow import MlflowClient

            for key, value in server.env(user).items():
                patch.setenv(key, value)
            mlflow.set_tracking_uri(server.url)
            return MlflowClient(tracking_uri=server.url)

        yield login
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def client(server, as_user):
    return as_user(server, "editor")


@pytest.mark.slow
def test_pipeline_logs_runs_metrics_models_and_report_to_the_server(served_run, server, client, tmp_path):
    import mlflow

    repo = served_run.path
    models = served_run.models
    assert {*(f"train@{m}" for m in models), *(f"evaluate@{m}" for m in models), "report"} <= served_run.ran
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # Artifacts go through the server (proxied), never straight to a path on this machine.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model_name"] for r in runs) == sorted(models)  # one run per model
    logged = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    for run in runs:
        name = run.data.tags["model_name"]
        assert run.data.params["train.lr"] == str(TINY["train"]["lr"]), name
        assert run.data.params["model.arch"] == name
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert [m.step for m in history] == list(range(1, TINY["train"]["epochs"] + 1)), name
        test = json.loads((repo / f"metrics/{name}/test.json").read_text())
        assert run.data.metrics["test/accuracy"] == pytest.approx(test["test/accuracy"]), name
        assert [m.source_run_id for m in logged].count(run.info.run_id) == 1, name
        local = client.download_artifacts(run.info.run_id, "report/report.html", str(tmp_path / name))
        html = Path(local).read_text(encoding="utf-8")
        assert all(m in html for m in models), name
    # The script honoured MLFLOW_ARTIFACTS_DESTINATION: the server stored the files there.
    stored = list(server.artifacts.rglob("report.html"))
    assert len(stored) == len(models), stored


@pytest.mark.slow
def test_runs_and_registry_live_in_postgresql(served_run, server, client):
    import psycopg2

    # Read the database directly: the server kept runs in PostgreSQL, not in a SQLite file.
    with psycopg2.connect(server.pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == len(served_run.models)
        cur.execute("SELECT name, version FROM model_versions")
        assert cur.fetchall() == [(REGISTERED, 1)]
        cur.execute("SELECT alias, version FROM registered_model_aliases")
        assert cur.fetchall() == [("champion", 1)]
        # Users and permissions too, in the same database (no basic_auth.db anywhere).
        cur.execute("SELECT username, is_admin FROM users ORDER BY username")
        assert cur.fetchall() == [("admin", True), ("editor", False), ("reader", False)]
    assert not list(server.log.parent.rglob("*.db"))
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert client.get_run(champion.run_id).data.tags["model_name"] == "cnn"


@pytest.mark.slow
def test_a_reader_may_look_and_load_the_champion_but_not_write(served_run, server, as_user, tmp_path):
    """READ: search runs, download the model through the artifact proxy, predict with
    `models:/<name>@champion`; but no new run, no metric, no moving the alias (403 each)."""
    from mlflow.exceptions import MlflowException

    reader = as_user(server, "reader")
    experiment = reader.get_experiment_by_name(EXPERIMENT)
    runs = reader.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model_name"] for r in runs) == sorted(served_run.models)
    champion = reader.get_model_version_by_alias(REGISTERED, CHAMPION)
    local = Path(reader.download_artifacts(champion.run_id, "report/report.html", str(tmp_path / "report")))
    assert "cnn" in local.read_text(encoding="utf-8")
    import mlflow

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED}@{CHAMPION}", dst_path=str(tmp_path / "m")))
    assert (model_dir / "MLmodel").is_file()
    refused = {
        "create a run": lambda: reader.create_run(experiment.experiment_id),
        "log a metric": lambda: reader.log_metric(runs[0].info.run_id, "val/loss", 0.0),
        "move the champion": lambda: reader.set_registered_model_alias(REGISTERED, CHAMPION, champion.version),
    }
    for what, attempt in refused.items():
        with pytest.raises(MlflowException) as info:
            attempt()
        # MLflow's client: "API request to endpoint /api/2.0/mlflow/runs/create failed with error
        # code 403 != 200. Response body: 'Permission denied'"
        assert info.value.get_http_status_code() == 403, what
        assert info.value.message.endswith("failed with error code 403 != 200. Response body: 'Permission denied'"), what
    assert reader.get_model_version_by_alias(REGISTERED, CHAMPION).version == champion.version

    # imgclf-predict, as the reader, straight from the registry.
    from PIL import Image

    image = tmp_path / "shirt.png"
    Image.new("L", (28, 28), 200).save(image)
    env = {**script_env(PYTHONPATH=str(served_run.path / "src")), **server.env("reader")}
    proc = subprocess.run([str(BIN / "python"), "-m", "imgclf.predict", str(image), "--model-uri",
                           f"models:/{REGISTERED}@{CHAMPION}", "--format", "json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    assert len(predictions) == 1, predictions

    # imgclf-champion, as the reader: moving the alias by hand is refused in one line, up front.
    proc = subprocess.run([str(BIN / "python"), "-m", "imgclf.champion_cli", "promote", str(champion.version),
                           "--reason", "I like it", "--name", REGISTERED], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: MLflow tracking server {server.url}: user 'reader' may not write to registered model "
        f"{REGISTERED!r} (403, has READ, needs EDIT); ask an admin for it: make mlflow-user MLFLOW_USER=reader "
        "PERMISSION=EDIT"]
    assert reader.get_model_version_by_alias(REGISTERED, CHAMPION).version == champion.version


@pytest.mark.slow
def test_queued_experiments_in_parallel_log_complete_runs_to_the_server(queued_runs, served_run, server, client):
    """Two queued experiments run at once (`dvc queue start -j 2`), both logging to the team
    server: each leaves complete runs, and the server's registry gets both cnn versions. Last
    in this module: the tests above count the runs of the first pipeline execution."""
    import psycopg2

    experiments = queued_runs.experiments
    check_experiment_runs(client, experiments, served_run.models, REGISTERED, ACCURACY_TAG)
    # Nothing went to a local store instead: no SQLite file in the project or its temp copies.
    assert not list(served_run.path.rglob("mlflow.db"))
    with psycopg2.connect(server.pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == len(queued_runs.before) + len(served_run.models) * len(experiments)
        cur.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (REGISTERED,))
        assert [v for (v,) in cur.fetchall()] == [1, 2, 3]
