"""End to end: `dvc repro` in a temporary copy of the repository, on a tiny real-format data
set served from a loopback HTTP server, so every stage runs its real code path."""

from __future__ import annotations

import json

import pytest
import yaml

from builds import copy_built_project, tiny_pipeline
from fixtures import TINY, git, set_params
from imgclf import checkpoint
from imgclf.dvcfiles import stages_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """This module's own copy of the tiny pipeline run once from scratch (tests/builds.py;
    test_team.py compares its own run with the same build); `first_run`: the stages that ran."""
    built = tiny_pipeline(tmp_path_factory)
    proj = copy_built_project(built.base, tmp_path_factory.mktemp("e2e") / "project")
    proj.first_run = built.ran
    return proj


def _stage_names():
    return {"validate", "download", "preprocess", "train@mlp", "train@cnn", "evaluate@mlp", "evaluate@cnn", "report"}


def test_first_repro_runs_every_stage_and_writes_outputs(project):
    repo = project.path
    assert project.first_run == _stage_names()
    assert sorted(p.name for p in (repo / "data/raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    meta = json.loads((repo / "data/processed/meta.json").read_text())
    assert meta["counts"] == {"train": 270, "val": 30, "test": 100}
    for name in ("mlp", "cnn"):
        test = json.loads((repo / f"metrics/{name}/test.json").read_text())
        assert test["test/images"] == 100
        assert set(test["test/per_class_accuracy"]) == set(meta["classes"])
        # The tiny classes are trivially separable: anything near chance (10%) means a broken loop.
        assert test["test/accuracy"] > 0.5, (name, test)
        history = (repo / f"metrics/{name}/history.csv").read_text().splitlines()
        assert history[0] == "epoch,lr,train/loss,train/accuracy,val/loss,val/accuracy"
        assert len(history) == 1 + TINY["train"]["epochs"]
        train = json.loads((repo / f"metrics/{name}/train.json").read_text())
        assert 1 <= train["best_epoch"] <= TINY["train"]["epochs"]
    html = (repo / "reports/report.html").read_text()
    assert "mlp" in html and "cnn" in html and "data:image/png;base64," in html
    assert (repo / "reports/report.md").read_text().count("figures/") >= 3


def test_dvc_plots_show_draws_curves_and_confusion_of_every_model(project):
    # tests/fixtures.py writes the copy's top-level plots for its own `models` keys, as
    # imgclf.schema.dvc_plots gives them (and tests/test_dvc_yaml.py requires of dvc.yaml).
    shown = json.loads(project.run("dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    expected = {
        "loss": {f"{m}/history.csv::{f}" for m in project.models for f in ("train/loss", "val/loss")},
        "accuracy": {f"{m}/history.csv::{f}" for m in project.models for f in ("train/accuracy", "val/accuracy")},
        "confusion": {f"{m}/predictions.csv" for m in project.models},
    }
    for plot, series in expected.items():
        values = shown["data"][plot][0]["content"]["data"]["values"]
        # DVC names each series by file (and field) below the files' common folder, metrics/.
        assert {v.get("filename::field", v.get("filename")) for v in values} == series, plot


def test_second_repro_runs_nothing(project):
    assert project.repro() == set()
    status = project.run("dvc", "status").stdout
    assert "Data and pipelines are up to date" in status


def test_mlflow_runs_carry_params_epochs_test_metrics_model_and_provenance(project):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name("fashion-mnist-lesson")
    runs = client.search_runs([experiment.experiment_id])
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/processed")
    from imgclf.tracking import file_sha256

    for name in ("mlp", "cnn"):
        sha = file_sha256(project.path / f"models/{name}/model.pt")
        matching = [r for r in runs if r.data.tags.get("model_sha256") == sha]
        assert len(matching) == 1, name
        run = matching[0]
        assert run.data.params["train.lr"] == "0.05"
        # The CNN trains on flips (Fashion-MNIST's mirror images keep the class), so it is
        # validated, tested and served on both views; the MLP trains without augmentation.
        assert run.data.params["train.flip_average"] == str(name == "cnn")
        assert checkpoint.load(project.path / f"models/{name}/model.pt")[1]["flip_average"] is (name == "cnn")
        assert run.data.tags["git_commit"] == git(project.path, "rev-parse", "HEAD")
        assert run.data.tags["data_version"] == data_md5
        assert run.data.tags["dvc_stage"] == f"train@{name}"
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert [m.step for m in history] == list(range(1, TINY["train"]["epochs"] + 1))
        test = json.loads((project.path / f"metrics/{name}/test.json").read_text())
        assert run.data.metrics["test/accuracy"] == pytest.approx(test["test/accuracy"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert "report/report.html" in artifacts
        logged = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
        assert any(m.source_run_id == run.info.run_id for m in logged), name


def test_the_registered_version_is_the_configured_models_run_among_both(project):
    import mlflow
    from mlflow import MlflowClient

    from imgclf.tracking import file_sha256

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    settings = yaml.safe_load((project.path / "params.yaml").read_text())["mlflow"]
    assert settings["register_model"] == "cnn"  # the shipped default, which the tiny params keep
    versions = client.search_model_versions(f"name = '{settings['registered_name']}'")
    assert [str(v.version) for v in versions] == ["1"]
    # Two models trained in the same experiment: the version is the cnn's run, found by the
    # cnn's model file, not the mlp's run.
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["model_name"] == "cnn"
    assert run.data.tags["model_sha256"] == file_sha256(project.path / "models/cnn/model.pt")


def test_logged_model_predicts_from_raw_pixels(project):
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("fashion-mnist-lesson")
    logged = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(logged[0].model_uri)
    images = np.load(project.path / "data/processed/test_images.npy")[:8]
    probs = np.asarray(model.predict(images))
    assert probs.shape == (8, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_bad_param_fails_in_one_line_and_leaves_outputs_untouched(project):
    outputs = {p: p.read_bytes() for p in (project.path / "models").rglob("*.pt")}
    outputs.update({p: p.read_bytes() for p in (project.path / "metrics").rglob("*.json")})
    original = (project.path / "params.yaml").read_text()
    try:
        set_params(project.path, lambda p: p["train"].__setitem__("lr", -1))
        expected = "error: train.lr: got -1: input should be greater than 0"
        # The stage script on its own...
        proc = project.run("python", "stages/train.py", "cnn", check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == expected
        assert "Traceback" not in proc.stderr
        # ...and through dvc repro, which the validate stage stops before DVC removes any
        # stage's outputs to rerun it.
        proc = project.run("dvc", "repro", check=False)
        assert proc.returncode != 0
        assert expected in proc.stderr
        assert "Running stage 'train@" not in proc.stdout
        assert {p: p.read_bytes() for p in outputs} == outputs
    finally:
        (project.path / "params.yaml").write_text(original)
    # Only the validate stage may run again (DVC removed its marker before it failed).
    assert project.repro() <= {"validate"}
    assert "up to date" in project.run("dvc", "status").stdout


def test_model_source_edit_reruns_neither_download_nor_preprocess(project):
    # What DVC finds changed is what `dvc repro` would run first (the report follows from the
    # new metrics); the edit is undone, so no stage is trained for it.
    models_py = project.path / "src/imgclf/models.py"
    original = models_py.read_text()
    models_py.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(project.run("dvc", "status", "--json").stdout)
    finally:
        models_py.write_text(original)
    # validate builds every model to check it fits the images (imgclf.crossfield), so it
    # reruns too; its output never changes, so download and preprocess do not follow it.
    assert set(status) == {"validate", "train@mlp", "train@cnn", "evaluate@mlp", "evaluate@cnn"}, status
    assert all(entry == [{"changed deps": {"src/imgclf/models.py": "modified"}}] for entry in status.values()), status
    assert "up to date" in project.run("dvc", "status").stdout


def _changed_stages(project, edit) -> dict[str, set[str]]:
    """What `dvc status` finds changed after `edit(params)`, as {stage: changed deps}; the edit
    is undone, so nothing is trained for it. What DVC finds changed is what `dvc repro` runs."""
    original = (project.path / "params.yaml").read_text()
    set_params(project.path, edit)
    try:
        status = json.loads(project.run("dvc", "status", "--json").stdout)
    finally:
        (project.path / "params.yaml").write_text(original)
    return {stage: {dep for entry in entries for dep in entry.get("changed deps", {})} for stage, entries in status.items()}


def test_a_shared_training_param_changes_every_model_one_models_param_only_that_one(project):
    shared = _changed_stages(project, lambda p: p["train"].__setitem__("lr", 0.03))
    # validate reads every param; each train stage reads the shared train section.
    assert set(shared) == {"validate", "train@mlp", "train@cnn"}, shared
    assert all(deps == {"params.yaml"} for deps in shared.values()), shared
    # One model's entry: its own stages and the report (which reads every model's entry).
    own = _changed_stages(project, lambda p: p["models"]["cnn"].__setitem__("hidden", 24))
    assert set(own) == {"validate", "train@cnn", "evaluate@cnn", "report"}, own
    assert all(deps == {"params.yaml"} for deps in own.values()), own
    assert "up to date" in project.run("dvc", "status").stdout


def test_preprocess_param_reruns_from_preprocess_down(project):
    original = (project.path / "params.yaml").read_text()
    set_params(project.path, lambda p: p["preprocess"].__setitem__("seed", 7))
    ran = stages_in(project.run("dvc", "repro", "preprocess").stdout)["ran"]
    # validate reran but wrote the same bytes, so download (its only dependant) did not.
    assert set(ran) == {"validate", "preprocess"}, ran
    # The new split is a changed dependency of every stage below: `dvc repro` would rerun them all.
    status = json.loads(project.run("dvc", "status", "--json").stdout)
    assert set(status) == _stage_names() - {"validate", "download", "preprocess"}, status
    for stage, entries in status.items():
        changed = {path for entry in entries for path in entry.get("changed deps", {})}
        assert "data/processed" in changed, (stage, entries)
    # The seed back: preprocess runs again (its persistent output keeps it out of DVC's run
    # cache) and splits exactly as the first time, so nothing below it is stale.
    (project.path / "params.yaml").write_text(original)
    assert "preprocess" in stages_in(project.run("dvc", "repro", "preprocess").stdout)["ran"]
    assert "up to date" in project.run("dvc", "status").stdout


def test_dvc_exp_run_of_one_models_training_param_reruns_only_that_model_and_tags_its_mlflow_run(project):
    import mlflow

    # The tiny cnn has no `train` overrides yet: `+` adds the key, as Hydra overrides do.
    out = project.run("dvc", "exp", "run", "-n", "lr-003", "-S", "+models.cnn.train.lr=0.03").stdout
    # `-S` edits params.yaml, then reproduces: what `dvc repro` after the same edit would run.
    # The mlp's stages and the data stages are untouched.
    assert set(stages_in(out)["ran"]) == {"validate", "train@cnn", "evaluate@cnn", "report"}, out
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "lr-003" in text and "test/accuracy" in text
    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["fashion-mnist-lesson"],
                              filter_string="tags.dvc_exp_name = 'lr-003'", output_format="list")
    assert [r.data.tags["model_name"] for r in runs] == ["cnn"]
    assert runs[0].data.params["train.lr"] == "0.03"
