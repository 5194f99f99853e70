"""Champion and challenger on a real MLflow store (SQLite in a temporary folder): registered
models whose every prediction is chosen (a lookup table from an image's id, written into its
first two pixels, logged and loaded exactly as the pipeline logs and serves models), so a
worse challenger, a significantly better one, one better by noise and one that drops a class
each meet the policy; the decision is recorded on the version and the run; the champion's
training manifest keeps overlapping test images out; repeating a pair changes nothing; a
class the champion lacks is left to a person. The pipeline itself: tests/test_champion_pipeline.py.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

from fixtures import save_processed
from imgclf import champion, registry, runlog
from imgclf.config import PromotionConfig
from imgclf.data.dataset import Split
from imgclf.errors import TrackingError
from imgclf.evaluation import Evaluation
from imgclf.models import Classifier
from imgclf.paths import ROOT, SRC_DIR

CLASSES = ["a", "b", "c", "d"]
PER_CLASS = 100
POLICY = PromotionConfig()


class Lookup(nn.Module):
    """Predicts table[id], the id being pixel (0, 0) * 256 + pixel (0, 1) of the raw image."""

    def __init__(self, table: list[int], n_classes: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.long))
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Classifier normalized with mean 0, std 1: x is pixels / 255.
        ids = (x[:, 0, 0, 0] * 255).round().long() * 256 + (x[:, 0, 0, 1] * 255).round().long()
        return nn.functional.one_hot(self.table[ids], self.n_classes).float() * 20


def _images(n: int) -> np.ndarray:
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def _processed(tmp_path, classes: list[str], per_class: int = PER_CLASS, trained_on_test: int = 0):
    """A processed data set: the test split sorted by class, a manifest whose test rows follow it,
    and training rows (the first `trained_on_test` test images are also listed as training)."""
    out = tmp_path / "processed"
    out.mkdir()
    labels = np.repeat(np.arange(len(classes)), per_class).astype(np.int64)
    images = _images(len(labels))
    split = Split(images, labels)
    meta = {"dataset": "toy", "classes": classes, "shape": [1, 8, 8], "resize": "pad"}
    save_processed(out, {"train": split, "val": split, "test": split}, meta)
    rows = [(f"{classes[k]}/t{i:04d}.png", classes[k], "test", f"sha-test-{i}", "") for i, k in enumerate(labels)]
    rows += [(f"{classes[k]}/x{i:04d}.png", classes[k], "train", f"sha-train-{i}", "") for i, k in enumerate(labels)]
    rows += [(f"{classes[k]}/y{i:04d}.png", classes[k], "train", f"sha-test-{i}", "")
             for i, k in enumerate(labels[:trained_on_test])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "split", "sha256", "note"])
    writer.writerows(sorted(rows))
    (out / "manifest.csv").write_text(buf.getvalue())
    return out, meta, [classes[k] for k in labels]


def _right_first(actual: list[str], right: dict[str, int], classes: list[str]) -> list[int]:
    """Class indices a model predicts: right on the first right[c] images of class c, else the next class."""
    seen: dict[str, int] = {}
    out = []
    for cls in actual:
        seen[cls] = seen.get(cls, 0) + 1
        ok = cls in classes and seen[cls] <= right.get(cls, 0)
        out.append(classes.index(cls) if ok else (classes.index(cls) + 1 if cls in classes else 0) % len(classes))
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("champion-unit", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment_id
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def name(request) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]


class Pipeline:
    """What the evaluate stage does for each new model, with models whose predictions are chosen."""

    def __init__(self, experiment_id, name, processed, meta, actual):
        self.experiment_id, self.name, self.processed, self.meta, self.actual = (
            experiment_id, name, processed, meta, actual)

    def evaluate(self, right: dict[str, int], classes: list[str] | None = None) -> champion.Challenge:
        import mlflow

        classes = classes or self.meta["classes"]
        predicted = _right_first(self.actual, right, classes)
        with mlflow.start_run(experiment_id=self.experiment_id) as run:
            # Indexed by today's image ids: it answers exactly `predicted` on today's test images.
            model = Classifier(Lookup(predicted, len(classes)), [0.0], [1.0])
            runlog.log_model(model, _images(4), SRC_DIR, classes, "pad")
        accuracy = float(np.mean([classes[p] == a for p, a in zip(predicted, self.actual)]))
        reg = registry.register(run.info.run_id, "cnn", self.name, accuracy, dataset="toy", move_alias=False)
        evaluation = Evaluation({"predicted": np.array(predicted), "metrics": {"test/accuracy": accuracy}},
                                np.array([classes.index(a) if a in classes else 0 for a in self.actual]),
                                list(classes), None)
        self.run_id = run.info.run_id
        return champion.challenge(reg, run.info.run_id, "cnn", evaluation, self.meta, POLICY, self.processed, ROOT)

    def champion(self) -> str:
        from mlflow import MlflowClient

        return champion.current_champion(MlflowClient(), self.name)

    def tags(self, version: str) -> dict[str, str]:
        from mlflow import MlflowClient

        return MlflowClient().get_model_version(self.name, version).tags


def test_each_challenger_gets_the_decision_the_policy_says(store, name, tmp_path, caplog):
    import mlflow

    processed, meta, actual = _processed(tmp_path, CLASSES)
    p = Pipeline(store, name, processed, meta, actual)
    first = p.evaluate({c: 80 for c in CLASSES})  # 80%
    assert (first.version, first.outcome, p.champion()) == ("1", "first", "1")
    assert p.tags("1")[champion.MANIFEST_TAG] == champion.MANIFEST_ARTIFACT

    worse = p.evaluate({c: 75 for c in CLASSES})
    assert (worse.outcome, p.champion()) == ("kept", "1") and "not better" in worse.reason
    noise = p.evaluate({"a": 81, "b": 81, "c": 80, "d": 80})  # +0.5 points: 2 discordant images
    assert (noise.outcome, p.champion()) == ("kept", "1") and "not significantly" in noise.reason
    drop = p.evaluate({"a": 100, "b": 100, "c": 100, "d": 70})  # +7.5 points overall, d -10
    assert drop.record["comparison"]["p_value"] < 1e-6
    assert (drop.outcome, p.champion()) == ("kept", "1") and "'d' drops 10.00 points" in drop.reason
    with caplog.at_level(logging.INFO, logger="imgclf.champion"):
        better = p.evaluate({c: 90 for c in CLASSES})  # +10 points, 40 discordant images, all its own
    assert (better.version, better.outcome, p.champion()) == ("5", "promoted", "5")

    # The record: tags on the version, JSON and Markdown on its run, one log line.
    tags = p.tags("5")
    assert tags["promotion.outcome"] == "promoted" and tags["promotion.compared_against"] == "1"
    assert float(tags["promotion.difference"]) == pytest.approx(0.10)
    assert tags["promotion.p_value"] == f"{2 * 0.5 ** 40:.6g}"  # 40 discordant, all the challenger's
    assert tags["promotion.worst_class_drop"] == "a: -0.100000"
    assert tags["promotion.images"] == "400"
    low, high = json.loads(tags["promotion.interval"])
    assert 0 < low < 0.10 == pytest.approx(high)
    stored = json.loads(mlflow.artifacts.load_text(f"runs:/{p.run_id}/champion/comparison.json"))
    assert stored == better.record
    assert stored["comparison"]["champion_accuracy"] == pytest.approx(0.80)
    assert stored["comparison"]["per_class"]["d"] == {"images": 100, "challenger": 0.9, "champion": 0.8,
                                                      "drop": pytest.approx(-0.1)}
    table = mlflow.artifacts.load_text(f"runs:/{p.run_id}/champion/comparison.md")
    assert "| overall | 90.00% | 80.00% | +10.00" in table
    lines = [r.getMessage() for r in caplog.records if r.name == "imgclf.champion"]
    assert len(lines) == 1 and lines[0].startswith(
        "cnn version 5 vs champion version 1 on the same 400 test images: 90.00% vs 80.00%")

    # The same pair again (evaluate ran again on the same model): the same record, no second move.
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(name, registry.CHAMPION, "1")  # rolled back by hand
    again = champion._challenge(client, name, "5", p.run_id, "cnn", None, meta, POLICY,
                                champion.test_images(processed, meta), ROOT)
    assert again.repeated and again.outcome == "promoted" and p.champion() == "1"
    assert p.tags("5") == tags


def test_champion_trained_on_some_test_images_is_compared_on_the_rest(store, name, tmp_path, caplog):
    processed, meta, actual = _processed(tmp_path, CLASSES, trained_on_test=30)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({c: 80 for c in CLASSES})  # its manifest lists the first 30 test images as training
    with caplog.at_level(logging.WARNING, logger="imgclf.champion"):
        result = p.evaluate({c: 90 for c in CLASSES})
    comparison = result.record["comparison"]
    assert (comparison["overlap"], comparison["compared"]) == (30, 370)
    assert comparison["per_class"]["a"]["images"] == 70
    warnings = [r.getMessage() for r in caplog.records if r.name == "imgclf.champion"]
    assert warnings == [f"cnn version 2 of {name}: 30 of today's 400 test images were in version 1's training "
                        "data (a changed preprocess.seed?): left out of the comparison"]


def test_a_new_class_is_compared_on_shared_classes_and_left_to_a_person(store, name, tmp_path):
    processed, meta, actual = _processed(tmp_path, [*CLASSES, "e"], per_class=50)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({c: 40 for c in CLASSES}, classes=CLASSES)  # version 1 knows a-d only
    result = p.evaluate({c: 50 for c in [*CLASSES, "e"]})  # knows e too, perfect everywhere
    assert (result.outcome, p.champion()) == ("manual", "1")
    assert "the challenger adds e" in result.reason and "4 shared classes" in result.reason
    comparison = result.record["comparison"]
    assert comparison["compared"] == 200 and comparison["new_classes"] == ["e"]
    assert comparison["per_class"]["e"] == {"images": 50, "challenger": 1.0, "champion": None, "drop": None}
    assert p.tags("2")["promotion.outcome"] == "manual"


def test_alias_moves_only_from_where_the_comparison_began(store, name, tmp_path):
    from mlflow import MlflowClient

    processed, meta, actual = _processed(tmp_path, CLASSES, per_class=5)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({c: 4 for c in CLASSES})
    p.evaluate({c: 3 for c in CLASSES})
    client = MlflowClient()
    with pytest.raises(TrackingError, match="moved from version 2 to 1 while this comparison ran"):
        champion.move_alias(client, name, "2", "2")
    assert p.champion() == "1"
