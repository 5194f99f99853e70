"""Session fixtures that two test files share, so what they share is built once per worker.

tests/conftest.py imports them (pytest finds fixtures in a conftest's namespace) and its
SAME_WORKER sends the files that use one of them to the same worker:
- `tiny_pipeline`: the tiny pipeline run from scratch, as test_pipeline.py's project, and as
  the second from-scratch run test_team.py compares its own with;
- `https_team_server`, `served_project`, `served_run`, `queued_runs`: the team server over
  HTTPS with the runs of a project logging to it, read by test_tracking_server.py through the
  REST API and PostgreSQL, and by test_mlflow_ui.py in a browser.

Each fixture records what the first run left (stages that ran, output hashes, runs), since
the tests that follow change the project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fixtures import ONE_MODEL, tiny_project


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny pipeline (both models), run once from scratch. `first_run`: the stages that ran;
    `first_outs`: dvc.lock's output hashes then; `first_threads`: {model: threads} it trained with."""
    from remotes import lock_outs

    with tiny_project(tmp_path_factory.mktemp("e2e")) as proj:
        proj.first_run = proj.repro()
        proj.first_outs = lock_outs(proj.path)
        proj.first_threads = {model: json.loads((proj.path / f"metrics/{model}/timing.json").read_text())["threads"]
                              for model in proj.models}
        yield proj


@pytest.fixture(scope="session")
def https_team_server(tmp_path_factory, request):
    """scripts/mlflow_server.sh over HTTPS with a throwaway CA, on its own PostgreSQL; users in
    PostgreSQL: the admin, an editor (EDIT) and a reader (READ), added the way
    `make mlflow-user` adds them."""
    from pgserver import start_postgres
    from teamserver import start_team_server

    pg = start_postgres()
    request.addfinalizer(pg.stop)  # runs after the server's own finalizer: last in, first out
    return start_team_server(pg, tmp_path_factory.mktemp("server"), request, tls=True,
                             users={"editor": "EDIT", "reader": "READ"})


@pytest.fixture(scope="session")
def served_project(tmp_path_factory):
    """A tiny project (the CNN alone) whose data is downloaded and split, nothing trained yet."""
    with tiny_project(tmp_path_factory.mktemp("served"), models=ONE_MODEL) as proj:
        proj.run("dvc", "repro", "preprocess")
        yield proj


@pytest.fixture(scope="session")
def served_run(served_project, https_team_server):
    """The whole tiny pipeline, logging to the team server as the editor; `ran`: its stages."""
    served_project.env.update(https_team_server.env("editor"))
    served_project.ran = served_project.repro()
    return served_project


@dataclass(frozen=True)
class QueuedRuns:
    experiments: dict[str, float]  # DVC experiment name -> its train.lr
    before: set[str]  # the run ids on the server before the experiments ran


@pytest.fixture(scope="session")
def queued_runs(served_run, https_team_server):
    """Two experiments (train.lr 0.03 and 0.04) queued from the committed project and run at
    once (`dvc queue start -j 2`), both logging to the team server as the editor."""
    from mlflow import MlflowClient

    from dvcqueue import EXPERIMENT, run_queued

    served_run.run("git", "add", "-A")
    served_run.run("git", "commit", "-qm", "tiny pipeline trained against the server")
    client = MlflowClient(tracking_uri=https_team_server.url)
    # The client reads the CA and the editor's credentials from the environment.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in https_team_server.env("editor").items():
            patch.setenv(key, value)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    return QueuedRuns(run_queued(served_run, ("0.03", "0.04")), before)
