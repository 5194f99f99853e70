"""Real-world names: any class name a folder can hold becomes an MLflow metric key that decodes
back to it, and file names that are not UTF-8, or that hold a newline or an escape sequence,
are processed or refused in one quoted, escaped line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import ROOT, make_project
from imgclf.config import DatasetConfig, PreprocessConfig
from imgclf.data import folder
from imgclf.data.prepare import write_processed
from imgclf.errors import DataError
from imgclf.metric_keys import MAX_KEY, class_key, class_keys, class_name

# The class names of a well-known public plant-disease set, and worse.
NAMES = ["Corn_(maize)", "Pepper,_bell", "it's+1", "Pfirsich Blätter 桃", "a:b", ":class3", ":3a", "x" * 300,
         "y" * 300, "tab\there", "bytes\udcff\udcfe", "...", "50%", "a/b", "emoji 🌽"]


def test_every_class_name_becomes_a_key_mlflow_accepts_and_decodes_back():
    from mlflow.utils.validation import _validate_metric_name

    keys = class_keys("test/accuracy", NAMES)
    assert len(keys) == len(NAMES)  # distinct
    for i, (key, name) in enumerate(keys.items()):
        _validate_metric_name(key)  # raises on a key MLflow would refuse
        assert len(key) <= MAX_KEY
        assert class_name(key, "test/accuracy", NAMES) == name == NAMES[i]
    assert class_key("test/accuracy", "Corn_(maize)", 0) == "test/accuracy/Corn_:28maize:29"


def test_metrics_of_odd_class_names_are_logged_to_a_real_store_and_read_back(tmp_path):
    import mlflow

    from imgclf import runlog

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("names", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment).info.run_id
    per_class = {name: i / 100 for i, name in enumerate(NAMES)}
    metrics, keys = runlog.test_metrics({"test/loss": 0.5, "test/accuracy": 0.75, "test/per_class_accuracy": per_class})
    runlog.log_metrics_to(client, run, metrics)
    logged = client.get_run(run).data.metrics
    assert logged.pop("test/loss") == 0.5 and logged.pop("test/accuracy") == 0.75
    assert {class_name(k, "test/accuracy", NAMES): v for k, v in logged.items()} == per_class
    assert {keys[k] for k in logged} == set(NAMES)  # the mapping the run keeps says the same


# --- file names ------------------------------------------------------------------------------

BAD_NAME = os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old camera or a Windows zip writes it


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _classes(root: Path, classes=("cat", "dog"), per_class: int = 30) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())


def _plan(**overrides) -> folder.ReadPlan:
    base = dict(shape=(1, 8, 8), resize="stretch", val_fraction=0.2, test_fraction=0.2, test_fraction_given=False,
                seed=0, skip_bad=False, workers=1)
    return folder.ReadPlan(**{**base, **overrides})


def test_a_file_name_that_is_not_utf8_is_refused_in_one_escaped_line(tmp_path):
    root = tmp_path / "photos"
    _classes(root)
    (root / "cat" / BAD_NAME).write_bytes(_png(3))
    with pytest.raises(DataError) as info:
        folder.read_tree(folder.scan_folder(root), _plan())
    message = str(info.value)
    assert message.splitlines() == [message] and message.isprintable()
    assert r"1 bad file(s): 'cat/caf\xe9.png': file name is not valid UTF-8 (rename it)" in message


def test_names_with_a_newline_or_escape_sequence_are_quoted_and_escaped(tmp_path):
    root = tmp_path / "photos"
    _classes(root)
    (root / "cat" / "evil\n\x1b[2J.png").write_text("not an image")
    with pytest.raises(DataError) as info:
        folder.read_tree(folder.scan_folder(root), _plan())
    assert r"'cat/evil\x0a\x1b[2J.png': not an image" in str(info.value)
    assert str(info.value).isprintable()


def test_with_skip_every_file_of_the_folder_and_archive_is_processed_and_written(tmp_path):
    """bad_files: skip: the not-UTF-8 names are left out, listed escaped, and every output file
    (splits, meta.json, the manifest) is written; a class name with punctuation and a newline
    in a valid name are used."""
    root = tmp_path / "data" / "images" / "odd"
    _classes(root, classes=("Corn_(maize)", "Pepper,_bell", "it's+1"))
    (root / "it's+1" / BAD_NAME).write_bytes(_png(3))
    (root / "Corn_(maize)" / "two\nlines.png").write_bytes(_png(200))
    out = tmp_path / "out"
    out.mkdir()
    entry = DatasetConfig(folder="data/images/odd", image_size=[8, 8], channels=1, bad_files="skip")
    meta = write_processed(out, "odd", entry, PreprocessConfig(val_fraction=0.2, seed=0), tmp_path / "raw",
                           tmp_path, workers=1)
    assert meta["classes"] == ["Corn_(maize)", "Pepper,_bell", "it's+1"]
    assert [s["path"] for s in meta["skipped"]] == [r"it's+1/caf\xe9.png"]
    assert sum(meta["counts"].values()) == 91
    texts = [p for p in out.iterdir() if p.suffix in (".json", ".csv")]
    assert texts
    for written in texts:
        written.read_text(encoding="utf-8")  # raises on bytes that are not UTF-8


def test_a_tar_member_whose_name_is_not_utf8_is_a_bad_file(tmp_path):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tar:
        for c in ("cat", "dog"):
            for i in range(30):
                data = _png(i + (100 if c == "dog" else 0))
                info = tarfile.TarInfo(f"{c}/{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(f"cat/{BAD_NAME}")
        data = _png(250)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"1 bad file\(s\): 'cat/caf\\xe9.png': file name is not valid UTF-8"):
        folder.read_tree(folder.scan_archive(archive), _plan())


def test_predict_writes_a_not_utf8_file_name_escaped_in_its_csv(tmp_path):
    from test_predict import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "model.pt")
    image = tmp_path / BAD_NAME
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8), "L").save(image, "PNG")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "imgclf.predict", os.fsencode(image), "--model", str(ckpt)],
                          capture_output=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode("utf-8").splitlines()
    assert len(lines) == 2 and lines[1].startswith(str(tmp_path) + r"/caf\xe9.png,")


# --- the whole pipeline ------------------------------------------------------------------------

ODD_CLASSES = ("Corn_(maize)", "Pepper,_bell", "it's+1", "Pfirsich Blätter 桃")


@pytest.mark.slow
def test_odd_class_names_train_evaluate_report_and_serve(tmp_path):
    """A folder whose classes are named as real data sets name them: the whole pipeline runs,
    every file a person reads carries the names as they are, MLflow's keys decode back to them,
    and imgclf-predict answers with them."""
    import json

    import mlflow

    from fixtures import TINY
    from imgclf.metric_keys import class_name as decode

    def params(p):
        p["download"]["dataset"] = "odd"
        p["datasets"]["odd"] = {"folder": "data/images/odd", "image_size": [16, 16], "channels": 1,
                                "test_fraction": 0.2}
        p["train"].update(TINY["train"], epochs=4, batch_size=16)
        p.update({k: TINY[k] for k in ("evaluate", "report")})
        p["models"] = {"cnn": TINY["models"]["cnn"]}

    project = make_project(tmp_path, params)
    rng = np.random.default_rng(0)
    for k, cls in enumerate(ODD_CLASSES):  # class k: a bright bar in rows 4k..4k+3
        (project.path / "data" / "images" / "odd" / cls).mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 50, (16, 16)).astype(np.uint8)
            pixels[4 * k : 4 * k + 4, 2:14] = rng.integers(190, 256)
            Image.fromarray(pixels, "L").save(project.path / "data" / "images" / "odd" / cls / f"{i}.png")
    project.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = project.run("dvc", "repro", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    test = json.loads((project.path / "metrics" / "cnn" / "test.json").read_text())
    assert set(test["test/per_class_accuracy"]) == set(ODD_CLASSES)
    report = (project.path / "reports" / "report.md").read_text()
    assert all(c.replace("_", r"\_") in report or c in report for c in ODD_CLASSES)

    client = mlflow.MlflowClient(tracking_uri=project.env["MLFLOW_TRACKING_URI"])
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if "test/accuracy" in r.data.metrics]
    per_class = {decode(k, "test/accuracy", list(ODD_CLASSES)): v for k, v in run.data.metrics.items()
                 if k.startswith("test/accuracy/")}
    assert per_class == pytest.approx(test["test/per_class_accuracy"])

    image = project.path / "data" / "images" / "odd" / ODD_CLASSES[2] / "0.png"
    served = project.run("python", "-m", "imgclf.predict", "--name", "cnn", str(image))
    row = served.stdout.splitlines()[1]
    assert any(row.startswith(f"{image},{c}," if "," not in c else f'{image},"{c}",') for c in ODD_CLASSES), row
