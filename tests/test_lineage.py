"""`imgclf-trace` on a real MLflow store (SQLite in a temporary directory): from every kind of
model handle to its lineage, from a data version to its runs and versions, and one line for
each kind of bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imgclf import champion, dvcfiles, lineage, runlog, tracking

NAME = "shirts"
SOURCE = {"v1": "1" * 32 + ".dir", "v2": "2" * 32 + ".dir"}
PROCESSED = {"v1": "a" * 32 + ".dir", "v2": "b" * 32 + ".dir"}


def _meta(version: str) -> dict:
    return {"dataset": "mine", "format": "folder", "version": {"dvc_md5": SOURCE[version]},
            "source": {"kind": "dvc add", "path": "data/images/mine"},
            "counts": {"train": 80, "val": 10, "test": 10}, "counts_per_class": {}}


def _train(tmp: Path, model: str, version: str, accuracy: float, monkeypatch) -> tuple[str, Path]:
    """A run as the train and evaluate stages leave it: provenance tags, params, the data, the
    model file's hash, test metrics. Returns (run id, model file)."""
    import mlflow

    monkeypatch.setattr(tracking, "data_version", lambda output="data/processed": PROCESSED[version])
    path = tmp / f"{model}-{version}.pt"
    path.write_bytes(f"weights of {model} on {version}".encode())
    experiment = tracking.setup("lineage-test")
    with runlog.training_run(experiment, model, {"train.lr": 0.1, "models.arch": "cnn"}, _meta(version)):
        mlflow.set_tags({"model_sha256": tracking.file_sha256(path)})
        mlflow.log_metrics({"test/accuracy": accuracy, "test/loss": 0.5, "train/loss": 0.4})
        run_id = mlflow.active_run().info.run_id
    return run_id, path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Two data versions, a model trained on each (both registered; the second is champion),
    and a run from before lineage was recorded."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first, first_file = _train(tmp_path, "cnn", "v1", 0.81, monkeypatch)
    second, second_file = _train(tmp_path, "cnn", "v2", 0.86, monkeypatch)
    client = mlflow.MlflowClient()
    client.create_registered_model(NAME)
    for run_id, accuracy in ((first, 0.81), (second, 0.86)):
        client.create_model_version(NAME, source=f"runs:/{run_id}/model", run_id=run_id,
                                    tags={"test_accuracy": repr(accuracy)})
    champion.move_alias(client, NAME, None, "1", "there was no champion")
    champion.move_alias(client, NAME, "1", "2", "significantly better")
    with mlflow.start_run(experiment_id=tracking.setup("lineage-test"), run_name="old") as old:
        mlflow.log_param("lr", 0.1)
    return {"runs": {"v1": first, "v2": second}, "files": {"v1": first_file, "v2": second_file},
            "old": old.info.run_id, "db": tmp_path / "mlflow.db"}


def trace(capsys, *argv: str) -> str:
    lineage.main(list(argv))
    return capsys.readouterr().out


def test_every_kind_of_handle_leads_to_the_same_lineage(store, capsys):
    run = store["runs"]["v2"]
    handles = [f"models:/{NAME}@champion", f"models:/{NAME}/2", run, str(store["files"]["v2"])]
    traced = [json.loads(trace(capsys, handle, "--json")) for handle in handles]
    for t in traced:
        assert t["run_id"] == run
        assert t["data_source_version"] == SOURCE["v2"] and t["data_version"] == PROCESSED["v2"]
        assert t["git_commit"] == tracking.git_commit() and t["git_clean"] in ("true", "false")
        assert t["metrics"] == {"test/accuracy": 0.86, "test/loss": 0.5}  # not train/ figures
        assert t["params"] == {"models.arch": "cnn", "train.lr": "0.1"}
        assert t["dataset"]["name"] == "mine" and t["dataset"]["profile"]["counts"]["train"] == 80
        (version,) = t["versions"]
        assert (version["name"], version["version"], version["aliases"]) == (NAME, "2", ["champion"])
        assert t["restore"][0] == f"git checkout {t['git_commit']}"
        assert t["restore"][-1] == f"sha256sum models/cnn/model.pt  # expect {tracking.file_sha256(store['files']['v2'])}"
    assert traced[0]["found_by"] == f"{NAME} version 2"
    # The first version: no alias now.
    first = json.loads(trace(capsys, f"models:/{NAME}/1", "--json"))
    assert first["run_id"] == store["runs"]["v1"] and first["versions"][0]["aliases"] == []


def test_the_text_form_names_data_code_metrics_registry_and_restore(store, capsys):
    text = trace(capsys, f"models:/{NAME}@champion")
    assert text.startswith(f"{NAME} version 2: model cnn, run {store['runs']['v2']}")
    assert f"data version:    {SOURCE['v2']}" in text and f"processed data:  {PROCESSED['v2']}" in text
    assert "test/accuracy 0.8600" in text
    assert f"{NAME} version 2: registered " in text and "alias champion now" in text
    # When it became champion, replacing which version, and why (the registry keeps no history).
    assert re.search(r"\n      \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: became champion \(replacing version 1\): "
                     r"significantly better\n", text), text
    first = trace(capsys, f"models:/{NAME}/1")
    assert "UTC: became champion: there was no champion\n" in first
    assert "UTC: stopped being champion (replaced by version 2): significantly better\n" in first
    assert "restore (in a fresh clone):" in text and "    dvc pull" in text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_data_version_lists_the_runs_and_versions_made_from_it(store, capsys, version):
    for given in (SOURCE[version], PROCESSED[version], PROCESSED[version].removesuffix(".dir")):
        result = json.loads(trace(capsys, "--data", given, "--json"))
        assert [r["run_id"] for r in result["runs"]] == [store["runs"][version]]
        number = "1" if version == "v1" else "2"
        expected = f"{NAME}/{number}" + (" @champion" if number == "2" else "")
        assert result["runs"][0]["versions"] == [expected]
    text = trace(capsys, "--data", SOURCE[version])
    assert text.startswith(f"data {SOURCE[version]}: 1 run(s)") and store["runs"][version] in text


def test_a_data_version_nothing_was_trained_on_lists_nothing(store, capsys):
    assert json.loads(trace(capsys, "--data", "9" * 32, "--json"))["runs"] == []


def _one_line_error(*argv: str, env_store: Path | None = None) -> str:
    """Run the command as a user does (its own process); it must fail in one line, writing nothing."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(lineage.__file__).parents[1]), "HOME": "/tmp"}
    if env_store is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{env_store}"
    proc = subprocess.run([sys.executable, "-m", "imgclf.lineage", *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_input_is_one_line_each(store, tmp_path):
    db = store["db"]
    assert "the registry has no alias 'best' of model 'shirts' (registered models: shirts)" in \
        _one_line_error("models:/shirts@best", env_store=db)
    assert "not a model handle" in _one_line_error("yesterday's model", env_store=db)
    assert "no such file" in _one_line_error("models/nope/model.pt", env_store=db)
    stranger = tmp_path / "stranger.pt"
    stranger.write_bytes(b"trained somewhere else")
    assert "no MLflow run in" in _one_line_error(str(stranger), env_store=db)
    assert f"run {store['old']} records no data_source_version or data_version: it was logged before" in \
        _one_line_error(store["old"], env_store=db)
    assert "not a git revision of this repository, nor a data hash" in \
        _one_line_error("--data", "no-such-branch", env_store=db)
    assert f"no MLflow store at {tmp_path / 'missing.db'}" in _one_line_error("1", env_store=tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()  # nothing written


def test_an_unreachable_tracking_server_is_one_line(store):
    env_uri = "http://127.0.0.1:9"  # the discard port: nothing answers
    proc = subprocess.run([sys.executable, "-m", "imgclf.lineage", "models:/shirts@champion"], capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(lineage.__file__).parents[1]),
                               "HOME": "/tmp", "MLFLOW_TRACKING_URI": env_uri})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {env_uri} is unreachable ([Errno 111] Connection refused); start it or "
        "unset MLFLOW_TRACKING_URI"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True,
                   capture_output=True)


def test_a_git_revision_names_its_data_by_the_dvc_file_and_dvc_lock(store, tmp_path):
    import mlflow

    repo = tmp_path / "repo"
    (repo / "data" / "images").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "README").write_text("before any data\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "no data yet")
    params = {"download": {"dataset": "mine"}, "datasets": {"mine": {"folder": "data/images/mine"}}}
    (repo / "params.yaml").write_text(json.dumps(params))
    for version in ("v1", "v2"):
        (repo / "data" / "images" / "mine.dvc").write_text(f"outs:\n- md5: {SOURCE[version]}\n  path: mine\n")
        (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  preprocess:\n    outs:\n"
                                       f"    - path: data/processed\n      md5: {PROCESSED[version]}\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", f"data {version}")
    client = mlflow.MlflowClient()
    for rev, version in (("HEAD~1", "v1"), ("HEAD", "v2"), ("HEAD:data/images/mine.dvc", "v2")):
        result = lineage.runs_on(client, rev, repo)
        assert [r["run_id"] for r in result["runs"]] == [store["runs"][version]]
        assert result["matched"]["data_source_version"] == [SOURCE[version]]
    with pytest.raises(lineage.DataError, match=r"HEAD~2: records no data version"):
        lineage.runs_on(client, "HEAD~2", repo)
    with pytest.raises(lineage.DataError, match=r"HEAD~2:data/images/mine.dvc: data/images/mine.dvc is not in that "
                                                r"revision"):
        lineage.runs_on(client, "HEAD~2:data/images/mine.dvc", repo)


@pytest.mark.slow
def test_a_pipeline_model_traces_and_its_restore_commands_rebuild_it_in_a_fresh_clone(tmp_path):
    from fixtures import ONE_MODEL, git, tiny_project

    with tiny_project(tmp_path, models=ONE_MODEL) as proj:
        proj.repro()
        remote = tmp_path / "remote"
        proj.run("dvc", "remote", "add", "-d", "local", str(remote))
        proj.run("git", "add", "-A")
        proj.run("git", "commit", "-qm", "results")
        proj.run("dvc", "push")
        results_commit = git(proj.path, "rev-parse", "HEAD")
        model_sha = tracking.file_sha256(proj.path / "models" / "cnn" / "model.pt")

        traced = json.loads(proj.run("python", "-m", "imgclf.lineage", "models/cnn/model.pt", "--json").stdout)
        assert traced["model"] == "cnn" and traced["model_sha256"] == model_sha
        meta = json.loads((proj.path / "data" / "processed" / "meta.json").read_text())
        assert traced["data_source_version"] == meta["version"]["checksums"]
        assert traced["data_version"] == dvcfiles.locked_outputs(proj.path)["data/processed"].md5
        assert traced["git_commit"] == git(proj.path, "rev-parse", "HEAD~1") and traced["git_clean"] == "true"
        assert traced["metrics"]["test/accuracy"] > 0.5
        assert traced["versions"][0]["aliases"] == ["champion"]
        # Both ways: the data version lists this run.
        on_data = json.loads(proj.run("python", "-m", "imgclf.lineage", "--data", traced["data_version"],
                                      "--json").stdout)
        assert traced["run_id"] in [r["run_id"] for r in on_data["runs"]]
        by_champion = json.loads(proj.run("python", "-m", "imgclf.lineage", "models:/fashion-mnist-classifier@champion",
                                          "--json").stdout)
        assert by_champion["run_id"] == traced["run_id"]

        # The restore commands, as printed, in a fresh clone with only git and the DVC remote.
        fresh = tmp_path / "fresh"
        subprocess.run(["git", "clone", "-q", str(proj.path), str(fresh)], check=True)
        restore = traced["restore"]
        assert restore[0].startswith(f"git checkout {results_commit}")
        for step in restore[:-1]:
            command = step.split("  #")[0].split()
            subprocess.run(command, cwd=fresh, env=proj.env, check=True, capture_output=True)
        assert tracking.file_sha256(fresh / "models" / "cnn" / "model.pt") == model_sha
