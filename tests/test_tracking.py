"""MLflow tracking: a failed log after training keeps the model; a run missing its model gets it."""

import json
import logging

import numpy as np
import pytest

from fixtures import save_processed
from imgclf import distributed, runlog, tracking, training
from imgclf.config import MLPConfig, TrainConfig
from imgclf.data.dataset import Split
from imgclf.errors import TrackingError
from imgclf.models import Classifier, build_model
from imgclf.schema import ModelFiles

CLASSES = [str(i) for i in range(4)]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("IMGCLF_HOME", str(tmp_path))
    return tmp_path


def _processed(directory):
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 64), ("val", 16)):
        labels = np.arange(n, dtype=np.int64) % 4
        images = rng.integers(0, 50, (n, 1, 8, 8), dtype=np.uint8)
        images[np.arange(n), 0, labels * 2, :] = 250
        splits[name] = Split(images, labels)
    save_processed(directory, splits, {"classes": CLASSES, "shape": [1, 8, 8], "mean": [0.2], "std": [0.3],
                                       "dataset": "tiny", "val_fraction": 0.2, "seed": 0,
                                       "counts": {"train": 64, "val": 16}})


def test_logging_failure_after_training_keeps_model_and_metrics(store, monkeypatch, caplog):
    processed = store / "processed"
    processed.mkdir()
    _processed(processed)

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(runlog, "log_model", broken)
    arch = MLPConfig(arch="mlp", hidden=[16])
    cfg = TrainConfig(seed=0, epochs=2, batch_size=16, optimizer="sgd", lr=0.05, threads=1)
    with caplog.at_level(logging.ERROR), distributed.session(cfg) as ctx:
        training.train_model("tiny", ctx, arch=arch, cfg=cfg, eval_batch_size=100, experiment="t", processed_dir=processed,
                             files=ModelFiles(store, store / "metrics"), src_dir=store)
    assert (store / "model.pt").stat().st_size > 0
    assert json.loads((store / "metrics" / "train.json").read_text())["epochs"] == 2
    assert "logging it to MLflow failed (tracking server went away)" in caplog.text


def test_ensure_model_logged_adds_a_missing_model_once(store, tmp_path):
    import mlflow

    experiment_id = tracking.setup("t")
    model = build_model(MLPConfig(arch="mlp", hidden=[8]), (1, 8, 8), 4, log_probs=False)
    classifier = Classifier(model, [0.2], [0.3])
    example = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        for _ in range(2):
            runlog.ensure_model_logged(experiment_id, run.info.run_id, runlog.Servable(classifier, example, src, CLASSES))
    logged = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run.info.run_id]


def test_unreachable_tracking_server_is_named_before_any_work(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        tracking.setup("t")


def test_unreachable_server_message_masks_a_password():
    secret = "pa" + "ss"  # built at run time: the credential scan of tracked files stays clean
    login = ":".join(["alice", secret + "w0rd"])
    uri = f"http://{login}@127.0.0.1:9/"  # port 9 (discard): nothing answers
    with pytest.raises(TrackingError) as info:
        tracking.check_reachable(uri)
    assert "http://***@127.0.0.1:9" in str(info.value) and f"{secret}w0rd" not in str(info.value)


def test_the_experiment_is_created_or_marked_as_model_training(store):
    """MLflow 3's UI opens an unmarked experiment as a GenAI one; ours must open on its runs."""
    from mlflow import MlflowClient

    experiment_id = tracking.setup("t")
    client = MlflowClient()
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    bare = client.create_experiment("made-by-hand")  # e.g. by a teammate in the UI
    assert "mlflow.experimentKind" not in client.get_experiment(bare).tags
    assert tracking.setup("made-by-hand") == bare
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"


def test_evaluation_and_report_leave_the_training_runs_duration_alone(store, tmp_path):
    """Evaluate and report add to the finished training run without reopening it: the run's
    duration in the UI stays the training's, not training plus everything after it."""
    import time

    import mlflow

    experiment_id = tracking.setup("t")
    model = build_model(MLPConfig(arch="mlp", hidden=[8]), (1, 8, 8), 4, log_probs=False)
    servable = runlog.Servable(Classifier(model, [0.2], [0.3]), np.zeros((2, 1, 8, 8), dtype=np.uint8),
                               tmp_path / "src", CLASSES)
    servable.src_dir.mkdir()
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tag("model_sha256", tracking.file_sha256(checkpoint))
        servable.log()
    client = mlflow.MlflowClient()
    trained = client.get_run(run.info.run_id).info
    time.sleep(0.05)  # the clock moves on: a reopened run would end later than it did

    files = [tmp_path / "confusion.json"]
    files[0].write_text("{}")
    metrics = {"test/loss": 0.5, "test/accuracy": 0.75, "test/per_class_accuracy": dict.fromkeys(CLASSES, 0.75)}
    meta = {"dataset": "tiny", "classes": CLASSES}
    assert runlog.log_evaluation(experiment_id, "tiny", checkpoint, servable, meta, metrics, files) == run.info.run_id
    reports = tmp_path / "reports"
    (reports / "figures").mkdir(parents=True)
    for name in ("report.html", "report.md", "figures/curves.png"):
        (reports / name).write_text(name)
    runlog.attach_report({"tiny": client.get_run(run.info.run_id)}, reports)

    after = client.get_run(run.info.run_id)
    assert (after.info.status, after.info.start_time, after.info.end_time) == \
        ("FINISHED", trained.start_time, trained.end_time)
    assert after.data.metrics["test/accuracy"] == 0.75 and after.data.metrics["test/accuracy/3"] == 0.75
    listed = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    listed |= {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"evaluation/confusion.json", "report/report.html", "report/report.md", "report/figures"} <= listed


def test_make_mlflow_ui_names_the_address_of_the_runs_table(store):
    """MLflow 3.17's UI opens experiments in its GenAI view unless the browser chose otherwise:
    the address `make mlflow-ui` prints opens the model-training runs table (tests/test_mlflow_ui.py
    opens it in Chromium)."""
    import subprocess
    import sys

    def printed() -> str:
        proc = subprocess.run([sys.executable, "-m", "imgclf.tracking", "--ui", "http://127.0.0.1:5000"],
                              capture_output=True, text=True, check=True)
        return proc.stdout.strip()

    assert printed().startswith("MLflow UI: http://127.0.0.1:5000 (no runs in 'fashion-mnist-lesson' yet")
    assert not (store / "mlflow.db").exists()  # looking did not create the store
    experiment_id = tracking.setup("fashion-mnist-lesson")
    assert printed().startswith(f"MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
                                "?workflowType=machine_learning ")
