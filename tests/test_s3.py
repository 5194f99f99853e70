"""The team's storage on S3, against a real S3 server (SeaweedFS, tests/s3server.py) on loopback:
the team MLflow server keeping artifacts in a bucket while clients hold no S3 credentials; a DVC
remote in the same bucket, pushed and pulled with `make pull`; and `make pull`'s one-line
diagnosis of each way S3 storage fails. docs/team.md describes the set-up these tests run.

The tiny pipeline is trained once (against the S3-backed MLflow server) and then pushed to DVC:
one training run serves both halves.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fixtures import ONE_MODEL, tiny_project
from pgserver import free_port
from remotes import check_teammate_is_ready, commit_all, lock_outs, output, publish, teammate
from s3server import start_s3_server
from teamserver import start_team_server

pytestmark = pytest.mark.slow

BUCKET = "imgclf-team"
ARTIFACTS = "mlflow"  # the MLflow server's prefix in the bucket
DVC_PREFIX = "dvc"    # the DVC remote's
EXPERIMENT = "fashion-mnist-lesson"
REGISTERED = "fashion-mnist-classifier"


def _without_s3_credentials(env: dict[str, str]) -> dict[str, str]:
    """A client's environment: nothing that would let it reach the bucket itself."""
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}


@pytest.fixture(scope="module")
def s3(request):
    server = start_s3_server()
    request.addfinalizer(server.stop)
    server.create_bucket(BUCKET)
    return server


@pytest.fixture(scope="module")
def mlflow_server(s3, postgres, tmp_path_factory, request):
    """The team server, artifacts in s3://BUCKET/mlflow; only the server holds the S3 keys."""
    work = tmp_path_factory.mktemp("mlflow-server")
    server = start_team_server(postgres, work, request, tls=False, users={}, extra={
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/{ARTIFACTS}",
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        **s3.aws_env,
    })
    server.work = work  # where a local artifact store would appear
    return server


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    """The tiny pipeline, logged to the team server from a workspace without S3 credentials,
    then committed."""
    with tiny_project(tmp_path_factory.mktemp("s3-team"), models=ONE_MODEL) as proj:
        proj.env = {**_without_s3_credentials(proj.env), **mlflow_server.env(mlflow_server.admin[0])}
        ran = proj.repro()
        assert {f"train@{m}" for m in proj.models} | {"report"} <= ran, ran
        commit_all(proj, "trained against the team server")
        yield proj


# 1. MLflow artifacts in the bucket, through the server ------------------------------------

def test_pipeline_artifacts_land_in_the_bucket_through_the_server(trained, s3, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    for key, value in mlflow_server.env(mlflow_server.admin[0]).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # Clients were given a proxied location: they upload to the server, never to S3.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    keys = s3.keys(BUCKET, f"{ARTIFACTS}/")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["model_name"] for r in runs) == sorted(trained.models)
    figures = sorted(p.name for p in (trained.path / "reports" / "figures").iterdir())
    assert figures, "the report wrote no figures"
    for run in runs:
        prefix = f"{ARTIFACTS}/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
        mine = {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}
        assert {"report/report.html", "report/report.md"} <= mine, sorted(mine)
        assert {f"report/figures/{f}" for f in figures} <= mine, sorted(mine)
    # One logged model per trained model, its MLmodel and weights stored in the bucket.
    models = [k.removesuffix("MLmodel") for k in keys if k.endswith("/MLmodel")]
    assert len(models) == len(trained.models), models
    for model in models:
        assert [k for k in keys if k.startswith(f"{model}data/")], f"no weights under {model}data/"
    # ...and nothing on the server's disk instead.
    assert sorted(p.name for p in mlflow_server.work.iterdir()) == ["server.log"]


def test_champion_loads_on_a_client_without_s3_credentials(trained, tmp_path):
    code = (
        "import os, sys, boto3, mlflow, numpy as np\n"
        "assert not [k for k in os.environ if k.startswith('AWS_')], 'the client has AWS settings'\n"
        "assert boto3.Session().get_credentials() is None, 'the client has S3 credentials'\n"
        f"model = mlflow.pyfunc.load_model('models:/{REGISTERED}@champion')\n"
        "images = np.load(sys.argv[1])[:4]\n"
        "print(np.asarray(model.predict(images)).shape)\n"
    )
    env = {**trained.env, "HOME": str(tmp_path)}  # no ~/.aws either
    proc = subprocess.run([sys.executable, "-c", code, str(trained.path / "data/processed/test_images.npy")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "(4, 10)", proc.stdout


# 2. DVC remote on S3 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_remote(trained, s3, tmp_path_factory):
    """alice adds the bucket as the team's remote (endpoint committed, keys in config.local only)
    and pushes everything, run cache included."""
    keys = {"access_key_id": s3.access_key, "secret_access_key": s3.secret_key}
    return publish(trained, tmp_path_factory.mktemp("s3-remote"), f"s3://{BUCKET}/{DVC_PREFIX}", keys, BUCKET,
                   lambda: [k.removeprefix(f"{DVC_PREFIX}/") for k in s3.keys(BUCKET, f"{DVC_PREFIX}/")],
                   shared={"endpointurl": s3.endpoint})


def test_teammate_clones_and_make_pull_brings_everything_from_s3(s3_remote, s3, tmp_path):
    alice = s3_remote.alice
    assert s3.secret_key not in (alice.path / ".dvc" / "config").read_text()
    bob = teammate(alice, tmp_path / "bob")
    assert not (bob.path / "models/cnn/model.pt").exists()  # a clone has no data of its own
    proc = bob.run("python", "-m", "imgclf.pull")  # what `make pull` runs
    assert "Traceback" not in output(proc)
    check_teammate_is_ready(alice, bob)


# 3. `make pull` when S3 storage fails --------------------------------------------------------

class Silent:
    """A TCP port that accepts connections and never answers (a hung server, a dropped route)."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.sock.close()


FAILURES = {
    # case: (remote settings to change (shared, private), the start of make pull's last line)
    "wrong secret key": ({}, {"secret_access_key": "not-the-key"},
                         "error: dvc pull: remote 'team' (s3://{bucket}/dvc at {endpoint}) refused this "
                         "workspace's credentials ("),
    "no such bucket": ({"url": "s3://no-such-bucket/dvc"}, {},
                       "error: dvc pull: remote 'team' (s3://no-such-bucket/dvc at {endpoint}): bucket "
                       "'no-such-bucket' does not exist there, so "),
    "nothing listens": ({"endpointurl": "refused"}, {},
                        "error: dvc pull: remote 'team' (s3://{bucket}/dvc at {endpoint}) does not answer ("),
    "server never answers": ({"endpointurl": "silent"}, {},
                             "error: dvc pull: remote 'team' (s3://{bucket}/dvc at {endpoint}) does not answer ("),
}


@pytest.mark.parametrize("case", FAILURES)
def test_make_pull_explains_an_s3_failure_in_one_line_and_writes_nothing(case, s3_remote, s3, tmp_path):
    shared, private, expected = FAILURES[case]
    bob = teammate(s3_remote.alice, tmp_path / "bob")
    # Short timeouts, one attempt: an endpoint that does not answer fails in seconds, not minutes.
    for key, value in {"connect_timeout": "1", "read_timeout": "1", **private}.items():
        bob.run("dvc", "remote", "modify", "--local", "team", key, value)
    bob.env = {**bob.env, "AWS_MAX_ATTEMPTS": "1"}
    with Silent() as silent:
        endpoint = {"refused": f"http://127.0.0.1:{free_port()}", "silent": silent}.get(
            shared.get("endpointurl"), s3.endpoint)
        for key, value in {**shared, "endpointurl": endpoint}.items():
            bob.run("dvc", "remote", "modify", "--local", "team", key, value)
        proc = bob.run("python", "-m", "imgclf.pull", check=False)
    assert proc.returncode == 2, output(proc)
    assert "Traceback" not in output(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected.format(bucket=BUCKET, endpoint=endpoint)), last
    assert "`make pull`" in last, last
    assert s3.secret_key not in output(proc)
    # Nothing half-written: no output of dvc.lock, nothing in the cache, no stray file in the clone.
    tracked = set(subprocess.run(["git", "ls-files"], cwd=bob.path, capture_output=True, text=True,
                                 check=True).stdout.split())
    arrived = [p for p in lock_outs(bob.path) if (bob.path / p).exists() and p not in tracked]
    assert arrived == [], arrived
    cache = bob.path / ".dvc" / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=bob.path, capture_output=True, text=True,
                          check=True).stdout == ""
