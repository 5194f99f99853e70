"""The model registry: the champion rule on a local store, the evaluate stage registering the
configured model, `models:/<name>@champion` serving raw pixels, and queued experiments
(`dvc queue start -j 2`) writing complete runs and versions into the project's one store."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dvcqueue import check_experiment_runs, run_queued
from fixtures import ONE_MODEL, ROOT, Project, git, tiny_project
from imgclf import registry
from imgclf.errors import ConfigError

REGISTERED = "fashion-mnist-classifier"


# --- the champion rule, on a local SQLite store (no training) ---------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the unit tests (creating its schema takes seconds); each test
    registers under its own name, so they stay independent."""
    import mlflow

    base = tmp_path_factory.mktemp("registry")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{base / 'mlflow.db'}")
    experiment_id = mlflow.create_experiment("registry-unit", artifact_location=(base / "artifacts").as_uri())
    yield experiment_id
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def name(request) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)


def _run_with_model(experiment_id: str, accuracy: float | None, with_model: bool = True) -> str:
    """A run as the pipeline leaves it: a logged model and (optionally) its test accuracy."""
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run(experiment_id=experiment_id) as run:
        if accuracy is not None:
            mlflow.log_metric("test/accuracy", accuracy)
        if with_model:
            # The rule needs a logged model entity, not its files: skip the seconds of log_model.
            MlflowClient().create_logged_model(experiment_id, name="model", source_run_id=run.info.run_id)
    return run.info.run_id


def _champion(name: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, registry.CHAMPION).version)


def test_first_version_becomes_champion(store, name, caplog):
    from mlflow import MlflowClient

    with caplog.at_level(logging.INFO, logger="imgclf.registry"):
        result = registry.register(_run_with_model(store, 0.8), "cnn", name, 0.8)
    assert (result.version, result.champion, result.promoted) == ("1", "1", True)
    assert _champion(name) == "1"
    version = MlflowClient().get_model_version(name, "1")
    assert version.tags[registry.ACCURACY_TAG] == "0.8"
    assert version.tags[registry.MODEL_KEY_TAG] == "cnn"
    lines = [r.getMessage() for r in caplog.records if r.name == "imgclf.registry"]
    assert lines == [f"cnn registered as {name} version 1 (test/accuracy 0.8000); it is the first champion"]


def test_worse_version_does_not_move_champion(store, name, caplog):
    registry.register(_run_with_model(store, 0.8), "cnn", name, 0.8)
    with caplog.at_level(logging.INFO, logger="imgclf.registry"):
        result = registry.register(_run_with_model(store, 0.7), "cnn", name, 0.7)
    assert (result.version, result.champion, result.promoted) == ("2", "1", False)
    assert _champion(name) == "1"
    assert "champion stays version 1 (0.8000)" in caplog.text


def test_better_version_takes_champion_and_a_tie_does_not(store, name, caplog):
    for accuracy in (0.8, 0.7):
        registry.register(_run_with_model(store, accuracy), "cnn", name, accuracy)
    with caplog.at_level(logging.INFO, logger="imgclf.registry"):
        better = registry.register(_run_with_model(store, 0.9), "cnn", name, 0.9)
    assert (better.version, better.previous_champion, better.promoted) == ("3", "1", True)
    assert _champion(name) == "3"
    assert "champion moved from version 1 (0.8000) to version 3" in caplog.text
    # Strictly higher only: an equal score leaves the alias on the version that got there first.
    tie = registry.register(_run_with_model(store, 0.9), "cnn", name, 0.9)
    assert (tie.version, tie.champion) == ("4", "3")
    assert _champion(name) == "3"


def test_same_run_registered_again_reuses_its_version(store, name):
    from mlflow import MlflowClient

    run_id = _run_with_model(store, 0.8)
    first = registry.register(run_id, "cnn", name, 0.8)
    again = registry.register(run_id, "cnn", name, 0.8)
    assert (first.version, again.version, again.reused) == ("1", "1", True)
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1
    assert _champion(name) == "1"


def test_champion_registered_by_hand_is_judged_by_its_run_metric(store, name):
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = _run_with_model(store, 0.85)
    model_id = registry.logged_model_id(client, run_id)
    client.create_registered_model(name)
    manual = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    client.set_registered_model_alias(name, registry.CHAMPION, manual.version)
    # No test_accuracy tag on the hand-made champion: its run's test/accuracy (0.85) counts.
    assert registry.register(_run_with_model(store, 0.8), "cnn", name, 0.8).champion == "1"
    assert registry.register(_run_with_model(store, 0.9), "cnn", name, 0.9).champion == "3"


def test_champion_is_only_beaten_by_a_model_of_the_same_data_set(store, name, caplog):
    first = registry.register(_run_with_model(store, 0.90), "cnn", name, 0.90, dataset="fashion_mnist")
    assert first.champion == "1"
    # 0.99 on MNIST is no better a Fashion-MNIST classifier: registered, not crowned.
    with caplog.at_level(logging.INFO, logger="imgclf.registry"):
        other = registry.register(_run_with_model(store, 0.99), "cnn", name, 0.99, dataset="mnist")
    assert (other.version, other.champion, other.previous_dataset) == ("2", "1", "fashion_mnist")
    assert "stays version 1, a fashion_mnist model: accuracies on different data sets do not compare" in caplog.text
    from mlflow import MlflowClient

    assert MlflowClient().get_model_version(name, "2").tags[registry.DATASET_TAG] == "mnist"
    # The same data set still competes on accuracy.
    assert registry.register(_run_with_model(store, 0.91), "cnn", name, 0.91, dataset="fashion_mnist").champion == "3"


def test_run_without_logged_model_registers_nothing(store, name, caplog):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with caplog.at_level(logging.WARNING, logger="imgclf.registry"):
        assert registry.register(_run_with_model(store, 0.8, with_model=False), "cnn", name, 0.8) is None
    assert "has no logged model" in caplog.text
    with pytest.raises(MlflowException):
        MlflowClient().get_registered_model(name)


def test_register_model_must_name_a_model_or_be_null():
    registry.check_target(None, ["mlp", "cnn"])
    registry.check_target("cnn", ["mlp", "cnn"])
    with pytest.raises(ConfigError) as err:
        registry.check_target("ccn", ["mlp", "cnn"])
    assert str(err.value) == "mlflow.register_model: got 'ccn': must be null or one of 'mlp', 'cnn'"


# --- one SQLite store opened by several processes at once (queued experiments) ----------

FIRST_USE = """
import sys
from imgclf import tracking
import mlflow
experiment_id = tracking.setup("fresh")
with mlflow.start_run(experiment_id=experiment_id):
    mlflow.log_metric("val/loss", float(sys.argv[1]), step=1)
"""


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """The first use creates the tables and the experiment; several stages doing it at the
    same moment (queued experiments on a fresh project) must not trip over each other."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "IMGCLF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    logs = [tmp_path / f"stage{i}.log" for i in range(2)]
    outs = [log.open("w") for log in logs]
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(i)], env=env, stdout=out,
                              stderr=subprocess.STDOUT) for i, out in enumerate(outs)]
    codes = [p.wait(timeout=300) for p in procs]
    for out in outs:
        out.close()
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiments = [e.name for e in mlflow.search_experiments()]
        assert experiments.count("fresh") == 1
        runs = mlflow.search_runs(experiment_names=["fresh"], output_format="list")
        assert sorted(r.data.metrics["val/loss"] for r in runs) == [0.0, 1.0]
    finally:
        mlflow.set_tracking_uri(previous)


# --- the pipeline: evaluate registers, the champion serves, queued experiments -----------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained project, git-committed (as `dvc exp run --queue` wants it), with its own
    SQLite MLflow store (MLFLOW_TRACKING_URI in its env)."""
    def register(params):
        params["mlflow"].update(register_model="cnn", registered_name=REGISTERED)

    with tiny_project(tmp_path_factory.mktemp("registry-e2e"), register, models=ONE_MODEL) as proj:
        proj.repro()
        git(proj.path, "add", "-A")
        git(proj.path, "commit", "-qm", "tiny trained")
        yield proj


def _client(project):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    return MlflowClient()


@pytest.mark.slow
def test_evaluate_registers_the_configured_model_as_first_champion(trained):
    from imgclf.tracking import file_sha256

    client = _client(trained)
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    run = client.get_run(version.run_id)
    # The version comes from the cnn's training run, found by its model file (which run among
    # several models': test_pipeline.py).
    assert run.data.tags["model_name"] == "cnn"
    assert run.data.tags["model_sha256"] == file_sha256(trained.path / "models/cnn/model.pt")
    test = json.loads((trained.path / "metrics/cnn/test.json").read_text())
    assert float(version.tags[registry.ACCURACY_TAG]) == pytest.approx(test["test/accuracy"])
    assert str(client.get_model_version_by_alias(REGISTERED, registry.CHAMPION).version) == "1"


@pytest.mark.slow
def test_champion_alias_loads_and_predicts_probabilities_from_raw_pixels(trained):
    import mlflow

    _client(trained)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion")
    images = np.load(trained.path / "data/processed/test_images.npy")
    labels = np.load(trained.path / "data/processed/test_labels.npy")
    assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28)
    probs = np.asarray(model.predict(images))
    assert probs.shape == (len(images), 10)
    assert np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # It is the evaluated cnn itself: its accuracy on the test split is the one reported.
    test = json.loads((trained.path / "metrics/cnn/test.json").read_text())
    assert float(np.mean(probs.argmax(axis=1) == labels)) == pytest.approx(test["test/accuracy"])


@pytest.mark.slow
def test_queued_experiments_log_complete_runs_into_the_one_store(trained):
    # No MLFLOW_TRACKING_URI: the default store, <project>/mlflow.db, must receive the runs
    # although DVC executes queued experiments in temporary copies under .dvc/tmp/exps.
    env = {k: v for k, v in trained.env.items() if k != "MLFLOW_TRACKING_URI"}
    project = Project(trained.path, env)
    default_store = f"sqlite:///{project.path / 'mlflow.db'}"
    experiments = run_queued(project, ("0.03", "0.04"))
    client = _client(Project(project.path, {"MLFLOW_TRACKING_URI": default_store}))
    # The project's one store: the queued copies under .dvc/tmp/exps wrote here, not there.
    assert not list((project.path / ".dvc" / "tmp").rglob("mlflow.db"))
    check_experiment_runs(client, experiments, trained.models, REGISTERED, registry.ACCURACY_TAG)
    # This store holds only the two experiments' versions.
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == 2
