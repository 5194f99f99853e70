"""The team tracking server: scripts/mlflow_server.sh on a throwaway PostgreSQL, the tiny
pipeline logging to it over HTTP, and everything read back through the server; two queued
experiments logging to it at once; plus the train stage refusing to start when the configured
server does not answer."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from dvcqueue import check_experiment_runs, run_queued
from fixtures import BIN, ROOT, TINY, stop_session, tiny_project, wait_for_mlflow
from imgclf.registry import ACCURACY_TAG
from pgserver import PgServer, free_port, start_postgres

SCRIPT = ROOT / "scripts" / "mlflow_server.sh"
EXPERIMENT = "fashion-mnist-lesson"
REGISTERED = "fashion-mnist-classifier"


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def test_server_script_needs_a_backend_store_uri(tmp_path):
    proc = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=_script_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: MLFLOW_BACKEND_STORE_URI is not set; set it to the team database, "
        "e.g. postgresql://user:password@host:5432/mlflow"]
    assert list(tmp_path.iterdir()) == []  # it stopped before creating the artifact directory


def test_server_script_defaults_driver_and_masked_password(tmp_path):
    """What the script hands to `mlflow server`, seen through a stand-in `mlflow` that prints
    its arguments (next to the real interpreter, which the script asks about drivers)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake / "mlflow").chmod(0o755)
    # A wrapper, not a symlink: a symlinked venv interpreter would not find the venv's packages.
    (fake / "python").write_text(f'#!/bin/sh\nexec "{BIN / "python"}" "$@"\n')
    (fake / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    # Built at run time so the credential scan of tracked files (test_security.py) stays clean.
    login = "team:" + "s3cret"
    env = _script_env(MLFLOW_BACKEND_STORE_URI=f"postgresql://{login}@db.example.org:5432/mlflow")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([str(SCRIPT), "--workers", "2"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    backend = f"postgresql+psycopg2://{login}@db.example.org:5432/mlflow"  # psycopg 3 is not installed
    assert proc.stdout.splitlines() == [
        "server", "--backend-store-uri", backend, "--serve-artifacts",
        "--artifacts-destination", str(work / "mlartifacts-server"),
        "--host", "127.0.0.1", "--port", "5000", "--workers", "2"]
    assert (work / "mlartifacts-server").is_dir()
    assert "s3cret" not in proc.stderr and "team:***@db.example.org" in proc.stderr


@dataclass
class Server:
    url: str
    artifacts: Path
    log: Path
    pg: PgServer


@pytest.fixture(scope="module")
def postgres(request):
    pg = start_postgres()
    request.addfinalizer(pg.stop)
    return pg


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory, request):
    """The script's server on a free loopback port, serving artifacts from its own folder."""
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    env = _script_env(MLFLOW_BACKEND_STORE_URI=postgres.uri, MLFLOW_ARTIFACTS_DESTINATION=str(work / "artifacts"),
                      MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port))
    log = work / "server.log"
    with log.open("wb") as out:
        # One worker: the tests are its only client, and the machine has few cores to spare.
        proc = subprocess.Popen([str(SCRIPT), "--workers", "1"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    request.addfinalizer(lambda: stop_session(proc))
    url = f"http://127.0.0.1:{port}"
    wait_for_mlflow(proc, url, log)
    return Server(url=url, artifacts=work / "artifacts", log=log, pg=postgres)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny project whose data is downloaded and split, nothing trained yet."""
    with tiny_project(tmp_path_factory.mktemp("served")) as proj:
        proj.run("dvc", "repro", "preprocess")
        yield proj


@pytest.mark.slow
def test_unreachable_tracking_server_stops_training_before_it_starts(prepared):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert not (prepared.path / "models/cnn/model.pt").exists()
    proc = subprocess.run(["python", "stages/train.py", "cnn"], cwd=prepared.path, capture_output=True, text=True,
                          env={**prepared.env, "MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflow tracking server ") and uri in last, last
    assert "Traceback" not in proc.stderr
    assert not (prepared.path / "models/cnn/model.pt").exists()
    assert not (prepared.path / "metrics/cnn").exists()


@pytest.fixture(scope="module")
def served_run(prepared, server):
    """The whole tiny pipeline, logging to the team server."""
    prepared.env["MLFLOW_TRACKING_URI"] = server.url
    prepared.ran = prepared.repro()
    return prepared


@pytest.fixture
def client(server):
    import mlflow
    from mlflow import MlflowClient

    # mlflow-artifacts:/ URIs resolve against the global tracking URI: point it at the server.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    yield MlflowClient(tracking_uri=server.url)
    mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_pipeline_logs_runs_metrics_models_and_report_to_the_server(served_run, server, client, tmp_path):
    import mlflow

    repo = served_run.path
    assert {"train@mlp", "train@cnn", "evaluate@mlp", "evaluate@cnn", "report"} <= served_run.ran
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # Artifacts go through the server (proxied), never straight to a path on this machine.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model_name"] for r in runs) == ["cnn", "mlp"]  # one run per model
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
        assert "mlp" in html and "cnn" in html, name
    # The script honoured MLFLOW_ARTIFACTS_DESTINATION: the server stored the files there.
    stored = list(server.artifacts.rglob("report.html"))
    assert len(stored) == 2, stored


@pytest.mark.slow
def test_runs_and_registry_live_in_postgresql(served_run, server, client):
    import psycopg2

    # Read the database directly: the server kept runs in PostgreSQL, not in a SQLite file.
    with psycopg2.connect(server.pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 2
        cur.execute("SELECT name, version FROM model_versions")
        assert cur.fetchall() == [(REGISTERED, 1)]
        cur.execute("SELECT alias, version FROM registered_model_aliases")
        assert cur.fetchall() == [("champion", 1)]
    assert not list(server.log.parent.rglob("*.db"))
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert client.get_run(champion.run_id).data.tags["model_name"] == "cnn"


@pytest.mark.slow
def test_queued_experiments_in_parallel_log_complete_runs_to_the_server(served_run, server, client):
    """Two queued experiments run at once (`dvc queue start -j 2`), both logging to the team
    server: each leaves complete runs, and the server's registry gets both cnn versions.
    Last in this module: the tests above count the runs of the first pipeline execution."""
    import psycopg2

    served_run.run("git", "add", "-A")
    served_run.run("git", "commit", "-qm", "tiny pipeline trained against the server")
    before = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])}
    experiments = run_queued(served_run, ("0.03", "0.04"))
    check_experiment_runs(client, experiments, REGISTERED, ACCURACY_TAG)
    # Nothing went to a local store instead: no SQLite file in the project or its temp copies.
    assert not list(served_run.path.rglob("mlflow.db"))
    with psycopg2.connect(server.pg.uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == len(before) + 2 * len(experiments)
        cur.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (REGISTERED,))
        assert [v for (v,) in cur.fetchall()] == [1, 2, 3]
