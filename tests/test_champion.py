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
    # The report's section is built from what evaluate recorded.
    from imgclf import champion_record, report

    decision = champion_record.recorded(name, p.run_id)
    assert decision["version"] == "5" and decision["record"] == better.record
    section = report._to_markdown(report._champion_blocks(decision))
    assert section.startswith("## Champion and challenger\n\nVersion 5 (cnn) against the champion, version 1, on "
                              "the same 400 test images: promoted, significantly better (p=1.82e-12 &lt; 0.05).")
    assert "| Overall | 90.00% | 80.00% | +10.00 (95% interval +8.24 to +10.00; McNemar p=1.82e-12) |" in section
    assert "| d | 90.00% | 80.00% | +10.00 |" in section
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
        champion.move_alias(client, name, "2", "2", "a test")
    assert p.champion() == "1"


# --- imgclf-champion: by hand, and on new images -------------------------------------------------

def _cli(env_uri: str, *args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "PYTHONPATH": str(SRC_DIR.parent)}
    env.pop("IMGCLF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "imgclf.champion_cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_promote_and_roll_back_by_hand_are_recorded(store, name, tmp_path, monkeypatch):
    import os

    from imgclf import champion_cli
    from imgclf.errors import ConfigError

    processed, meta, actual = _processed(tmp_path, CLASSES, per_class=5)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({c: 4 for c in CLASSES})
    p.evaluate({c: 3 for c in CLASSES})  # worse: kept
    assert p.champion() == "1"
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    assert champion_cli.move(name, "2", "the new photos look like version 2's", "promoted") == "1"
    assert p.champion() == "2"
    tags = p.tags("2")
    assert {k: v for k, v in tags.items() if k.startswith("promotion.manual.")} == {
        "promotion.manual.action": "promoted", "promotion.manual.by": "alice",
        "promotion.manual.reason": "the new photos look like version 2's", "promotion.manual.replaced": "1"}
    assert tags["promotion.outcome"] == "kept"  # the automatic decision stays on record beside it
    champion_cli.move(name, "1", "version 2 misreads the night shots", "rolled back")
    assert p.champion() == "1" and p.tags("1")["promotion.manual.action"] == "rolled back"
    # Each version's history: when it became and stopped being champion, and why, oldest first.
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    history = {v: p.tags(v)[champion.HISTORY_TAG].splitlines() for v in ("1", "2")}
    assert [re.fullmatch(f"{when}: (.*)", line).group(1) for line in history["1"]] == [
        "became champion: there was no champion (evaluate@cnn)",
        "stopped being champion (replaced by version 2): promoted by hand by alice: the new photos look like "
        "version 2's",
        "became champion (replacing version 2): rolled back by hand by alice: version 2 misreads the night shots"]
    assert [re.fullmatch(f"{when}: (.*)", line).group(1) for line in history["2"]] == [
        "became champion (replacing version 1): promoted by hand by alice: the new photos look like version 2's",
        "stopped being champion (replaced by version 1): rolled back by hand by alice: version 2 misreads the "
        "night shots"]

    # A version of another data set, an unknown version, no reason: one line each, nothing moved.
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(name, "2", registry.DATASET_TAG, "mnist")
    with pytest.raises(ConfigError, match="version 2 is a mnist model and the champion .version 1. a toy one"):
        champion_cli.move(name, "2", "try it", "promoted")
    proc = _cli(os.environ["MLFLOW_TRACKING_URI"], "promote", "7", "--reason", "why not", "--name", name)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: version 7 of {name!r} does not exist (versions: 1, 2); nothing moved")
    with pytest.raises(ConfigError, match="--reason: say why"):
        champion_cli.move(name, "2", "  ", "promoted")
    assert p.champion() == "1"


def _write_folder(root, counts: dict[str, int], first_id: int = 0):
    """Real PNG files, class folders, each image's id in its first two pixels."""
    from PIL import Image

    i = first_id
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            pixels = _images(i + 1)[i, 0]
            Image.fromarray(pixels, "L").save(root / cls / f"img{i:04d}.png")
            i += 1
    return root


def test_score_prints_accuracy_per_class_and_logs_a_run(store, name, tmp_path):
    import os

    import mlflow

    processed, meta, actual = _processed(tmp_path, CLASSES, per_class=10)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({"a": 10, "b": 9, "c": 5, "d": 10})  # version 1: champion; its table covers ids 0..39
    # The new folder holds the same images as files: a 10, b 9, c 5 (the rest as d), d 10 right.
    folder = _write_folder(tmp_path / "new", {c: 10 for c in CLASSES})
    proc = _cli(os.environ["MLFLOW_TRACKING_URI"], "score", str(folder), "--name", name, "--experiment", "weekly")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"models:/{name}@champion (version 1) on 40 images of 4 classes in {folder}:"
    # 34 of 40; the exact interval is Clopper-Pearson's (checked by hand in test_promotion.py).
    assert out[1].startswith("accuracy 85.00% (95% interval 70.2% to 94.3%)")
    # 5 of 10: the textbook Clopper-Pearson interval, 18.7% to 81.3%.
    assert [line.split() for line in out if line.startswith("c ")] == [["c", "10", "50.00%", "18.7%", "to", "81.3%"]]
    assert out[-1] == "most confused (actual as predicted, images): c as d 5, b as c 1"
    runs = mlflow.search_runs(experiment_names=["weekly"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["evaluated_model"] == f"models:/{name}/1" and run.data.tags["model_version"] == "1"
    assert run.data.metrics["new/accuracy"] == pytest.approx(0.85)
    assert run.data.metrics["new/accuracy/c"] == pytest.approx(0.5)

    # A class the model does not know, an unreadable file: one line each, no run logged.
    (folder / "e").mkdir()
    (folder / "e" / "x.png").write_bytes(_png_bytes())
    proc = _cli(os.environ["MLFLOW_TRACKING_URI"], "score", str(folder), "--name", name, "--experiment", "weekly")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder}: class folder(s) e unknown to the model (it knows a, b, c, d); "
        "score only classes it was trained on")
    (folder / "e" / "x.png").unlink()
    (folder / "e").rmdir()
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    proc = _cli(os.environ["MLFLOW_TRACKING_URI"], "score", str(folder), "--name", name, "--experiment", "weekly")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 unreadable image file(s): {folder / 'a' / 'broken.png'}: ")
    assert len(mlflow.search_runs(experiment_names=["weekly"], output_format="list")) == 1


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_a_champion_without_training_manifest_is_not_replaced_automatically(store, name, tmp_path, caplog):
    import mlflow

    processed, meta, actual = _processed(tmp_path, CLASSES, per_class=20)
    # Version 1 registered by hand: a logged model, no manifest anywhere.
    with mlflow.start_run(experiment_id=store) as run:
        table = _right_first(actual, {c: 10 for c in CLASSES}, CLASSES)
        runlog.log_model(Classifier(Lookup(table, 4), [0.0], [1.0]), _images(4), SRC_DIR, CLASSES, "pad")
    registry.register(run.info.run_id, "cnn", name, 0.5, dataset="toy")
    p = Pipeline(store, name, processed, meta, actual)
    with caplog.at_level(logging.WARNING, logger="imgclf.champion"):
        result = p.evaluate({c: 20 for c in CLASSES})  # perfect, and still left to a person
    assert (result.outcome, p.champion()) == ("manual", "1")
    assert "records no training manifest" in result.reason
    assert [r.getMessage() for r in caplog.records if r.name == "imgclf.champion"] == [
        f"cnn version 2 of {name}: version 1 records no training manifest: whether it trained on today's test "
        "images cannot be checked"]


def test_a_second_evaluation_waits_for_the_first_to_finish_with_the_alias(store, name, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(champion, "LOCK_WAIT_S", 1)

    def contender(queue):
        try:
            with champion.champion_lock(name):
                queue.put("got it")
        except TrackingError as exc:
            queue.put(str(exc))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with champion.champion_lock(name):
        proc = ctx.Process(target=contender, args=(queue,))
        proc.start()
        proc.join(30)
        assert queue.get(timeout=5).startswith("another process has held the champion lock")
    proc = ctx.Process(target=contender, args=(queue,))
    proc.start()
    proc.join(30)
    assert queue.get(timeout=5) == "got it"


class Brightness(nn.Module):
    """Class k for images of mean brightness near 30 + 60k (any size): survives resizing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (x.mean(dim=(1, 2, 3)) * 255 / 60).floor().long().clamp(0, 3)
        return nn.functional.one_hot(k, 4).float() * 20


def test_champion_of_another_image_size_reads_todays_files_its_own_way(store, name, tmp_path):
    """Today's data is 12x12; the champion takes 8x8: it is scored on today's test files decoded
    again at its size and by its resizing, not on today's arrays."""
    import mlflow
    from PIL import Image

    root = tmp_path / "project"
    folder = root / "data/images/shades"
    processed = tmp_path / "processed"
    processed.mkdir()
    rows, images, labels = [], [], []
    for k, cls in enumerate(CLASSES):
        (folder / cls).mkdir(parents=True)
        for i in range(5):
            rel = f"{cls}/{i}.png"
            Image.fromarray(np.full((12, 12), 30 + 60 * k, dtype=np.uint8), "L").save(folder / rel)
            rows.append((rel, cls, "test", f"sha-{cls}-{i}", ""))
            images.append(np.full((1, 12, 12), 30 + 60 * k, dtype=np.uint8))
            labels.append(k)
    split = Split(np.stack(images), np.array(labels, dtype=np.int64))
    meta = {"dataset": "toy", "classes": CLASSES, "shape": [1, 12, 12], "resize": "pad",
            "source": {"kind": "dvc add", "path": "data/images/shades"}}
    save_processed(processed, {"train": split, "val": split, "test": split}, meta)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("path", "class", "split", "sha256", "note"), *sorted(rows)])
    (processed / "manifest.csv").write_text(buf.getvalue())

    with mlflow.start_run(experiment_id=store) as run:  # the champion: 8x8 input
        runlog.log_model(Classifier(Brightness(), [0.0], [1.0]), np.zeros((4, 1, 8, 8), np.uint8), SRC_DIR,
                         CLASSES, "stretch")
    registry.register(run.info.run_id, "cnn", name, 1.0, dataset="toy")
    from mlflow import MlflowClient

    champion.record_manifest(MlflowClient(), run.info.run_id, name, "1", processed)  # trained on none of these
    with mlflow.start_run(experiment_id=store) as run:
        runlog.log_model(Classifier(Brightness(), [0.0], [1.0]), np.zeros((4, 1, 12, 12), np.uint8), SRC_DIR,
                         CLASSES, "pad")
    reg = registry.register(run.info.run_id, "cnn", name, 1.0, dataset="toy", move_alias=False)
    evaluation = Evaluation({"predicted": np.array(labels), "metrics": {"test/accuracy": 1.0}}, np.array(labels),
                            list(CLASSES), None)
    result = champion.challenge(reg, run.info.run_id, "cnn", evaluation, meta, POLICY, processed, root)
    # Version 1 read the 12x12 files at 8x8 and got every one right; today's 12x12 arrays it
    # cannot take (its exported program's input is 8x8).
    assert result.record["comparison"]["champion_accuracy"] == 1.0
    from imgclf.predict import from_mlflow

    with pytest.raises(Exception):  # noqa: B017 - whichever error torch.export's shape guard raises
        champion.score(from_mlflow(f"models:/{name}/1"), split.images)
    assert result.record["comparison"]["compared"] == 20 and result.outcome == "kept"


def test_the_record_says_what_changed_in_the_data_since_the_champion_learned(store, name, tmp_path):
    """The champion's manifest (kept with its version) against today's: per class, images added,
    removed and relabelled, and both versions' counts; the report shows it."""
    from imgclf.champion_record import recorded
    from imgclf.report import _data_change_blocks

    processed, meta, actual = _processed(tmp_path, CLASSES, per_class=5)
    p = Pipeline(store, name, processed, meta, actual)
    p.evaluate({c: 2 for c in CLASSES})
    manifest = processed / "manifest.csv"
    rows = list(csv.reader(io.StringIO(manifest.read_text())))
    header, body = rows[0], rows[1:]
    train = [r for r in body if r[2] == "train"]
    b_rows = [r for r in train if r[1] == "b"][:2]
    c_row = next(r for r in train if r[1] == "c")
    body = [r for r in body if r not in b_rows]  # two of b's training images removed
    body[body.index(c_row)] = [c_row[0].replace("c/", "d/"), "d", "train", c_row[3], ""]  # relabelled c -> d
    body += [[f"a/new{i}.png", "a", "train", f"sha-new-{i}", ""] for i in range(3)]  # three added to a
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *sorted(body)])
    manifest.write_text(buf.getvalue())
    p.evaluate({c: 5 for c in CLASSES})  # version 2, against version 1 and the data it learned

    change = recorded(name, p.run_id)["record"]["data_change"]
    assert change["changes"] == {"a": {"added": 3}, "b": {"removed": 2}, "c": {"relabelled_out": 1},
                                 "d": {"relabelled_in": 1}}
    assert change["moved_split"] == 0
    assert change["counts"]["old"]["a"] == {"train": 5, "val": 0, "test": 5}
    assert change["counts"]["new"]["a"] == {"train": 8, "val": 0, "test": 5}
    assert change["relabelled"] == [{"path": c_row[0].replace("c/", "d/"), "from": "c", "to": "d"}]
    blocks = _data_change_blocks(change, "1")
    assert blocks[0] == ("h3", "What changed in the data")
    table = next(b for b in blocks if b[0] == "table")
    assert table[2][0] == ["a", "5/0/5", "8/0/5", "3", "0", "0", "0"]
    assert table[2][1] == ["b", "5/0/5", "3/0/5", "0", "2", "0", "0"]


# A stage process of its own: waits for `go`, then evaluates one challenger as evaluate@ would.
CONTENDER = """
import json, sys, time
from pathlib import Path

import numpy as np

sys.path.insert(0, sys.argv[1])
import test_champion as t

tmp, experiment_id, name, right = Path(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
processed = tmp / "processed"
meta = json.loads((processed / "meta.json").read_text())
actual = [meta["classes"][k] for k in np.load(processed / "test_labels.npy")]
while not (tmp / "go").exists():
    time.sleep(0.01)
challenge = t.Pipeline(experiment_id, name, processed, meta, actual).evaluate(right)
print(json.dumps([challenge.version, challenge.outcome]))
"""


@pytest.mark.slow
def test_two_evaluations_at_once_leave_the_champion_the_rule_says(store, name, tmp_path):
    """Two stage processes evaluate at the same moment, a good challenger and a better one: in
    either order the rule crowns the better one (the good one may be crowned first, then beaten),
    so whatever the interleaving it must end champion, never the one that merely wrote last."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    processed, meta, actual = _processed(tmp_path, CLASSES)
    Pipeline(store, name, processed, meta, actual).evaluate({c: 50 for c in CLASSES})  # version 1: 50%
    good, better = {c: 80 for c in CLASSES}, {c: 95 for c in CLASSES}
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(Path(__file__).parent), str(tmp_path), store, name,
                               json.dumps(right)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ.copy())
             for right in (good, better)]
    (tmp_path / "go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    (good_version, good_outcome), (better_version, better_outcome) = results
    p = Pipeline(store, name, processed, meta, actual)
    assert p.champion() == better_version and better_outcome == "promoted"
    # The good one went first and was crowned, or second and compared with the better one.
    assert good_outcome in ("promoted", "kept")
    compared = p.tags(good_version)["promotion.compared_against"]
    assert compared == ("1" if good_outcome == "promoted" else better_version)
    assert p.tags(better_version)["promotion.compared_against"] == ("1" if good_outcome == "kept" else good_version)
