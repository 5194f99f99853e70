"""Champion and challenger through the real pipeline (`dvc repro` on a tiny image folder):
version 1 of the data trains the first champion; version 2 adds images and a class, and its
model is compared with the champion re-scored on exactly today's test images (the manifest's),
compared on the shared classes and left to a person; a changed champion makes `dvc repro` run
nothing and restores no decision; the same pair evaluated again keeps its record; the champion
is promoted and rolled back by hand and scored on a folder of new images.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from fixtures import git, make_project
from test_image_folder_workflow import CLASSES, FOLDER, SIZE, _commit_all, _image_bytes, _track, folder_params

pytestmark = pytest.mark.slow

REGISTERED = "bars-classifier"
NEW_CLASS = "blank"  # no bar: noise only


def _params(params: dict) -> None:
    folder_params(params)
    params["mlflow"].update(register_model="cnn", registered_name=REGISTERED)


def _write(folder, prefix: str, per_class: int, seed: int, classes=CLASSES) -> None:
    rng = np.random.default_rng(seed)
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt = "png" if i % 2 == 0 else "jpg"
            if cls == NEW_CLASS:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 50, size=(SIZE, SIZE)).astype(np.uint8), "L").save(buf, "PNG")
                data, fmt = buf.getvalue(), "png"
            else:
                data = _image_bytes(CLASSES.index(cls), rng, fmt)
            (folder / cls / f"{prefix}{i:03d}.{fmt}").write_bytes(data)


def _client(project):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    return MlflowClient()


def _repro(project, *args: str) -> tuple[set[str], str]:
    from imgclf.dvcfiles import stages_in

    proc = project.run("dvc", "repro", *args)
    return set(stages_in(proc.stdout)["ran"]), proc.stdout + proc.stderr


def _test_rows(project) -> list[dict[str, str]]:
    with (project.path / "data/processed/manifest.csv").open(newline="") as fh:
        return sorted((r for r in csv.DictReader(fh) if r["split"] == "test" and not r["note"]),
                      key=lambda r: r["path"])


def test_champion_and_challenger_through_the_pipeline(tmp_path):
    project = make_project(tmp_path, _params)
    _write(project.path / FOLDER, "a", per_class=24, seed=1)
    _track(project, "images v1")
    ran, out = _repro(project)
    assert "evaluate@cnn" in ran
    client = _client(project)
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "1"
    v1 = client.get_model_version(REGISTERED, "1")
    assert v1.tags["promotion.outcome"] == "first"
    assert v1.tags["training_manifest"] == "data/manifest.csv"
    import mlflow

    kept = mlflow.artifacts.load_text(f"runs:/{v1.run_id}/data/manifest.csv")
    assert kept == (project.path / "data/processed/manifest.csv").read_text()
    _commit_all(project, "trained v1")

    # Version 2: more images of every class, and a class version 1 never saw.
    _write(project.path / FOLDER, "b", per_class=12, seed=2)
    _write(project.path / FOLDER, "c", per_class=30, seed=3, classes=(NEW_CLASS,))
    _track(project, "images v2")
    ran, out = _repro(project)
    assert "evaluate@cnn" in ran and "train@cnn" in ran
    v2 = client.get_model_version(REGISTERED, "2")
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "1"
    assert v2.tags["promotion.outcome"] == "manual" and v2.tags["promotion.compared_against"] == "1"
    assert f"the challenger adds {NEW_CLASS}" in v2.tags["promotion.reason"]
    record = json.loads(mlflow.artifacts.load_text(f"runs:/{v2.run_id}/champion/comparison.json"))
    comparison = record["comparison"]
    # Exactly today's test images: the manifest's test rows, class by class, none left out (the
    # content-hash split keeps every version-1 training image out of today's test split).
    rows = _test_rows(project)
    assert comparison["images"] == len(rows) == json.loads((project.path / "metrics/cnn/test.json").read_text())[
        "test/images"]
    assert comparison["overlap"] == 0
    assert comparison["compared"] == sum(r["class"] != NEW_CLASS for r in rows)
    assert {c: f["images"] for c, f in comparison["per_class"].items()} == {
        c: sum(r["class"] == c for r in rows) for c in sorted({r["class"] for r in rows})}
    assert comparison["per_class"][NEW_CLASS]["champion"] is None
    assert comparison["new_classes"] == [NEW_CLASS]
    v1_training = {r["sha256"] for r in csv.DictReader(io.StringIO(kept)) if r["split"] in ("train", "val")}
    assert not v1_training & {r["sha256"] for r in rows}
    # One log line, and the report's section; then the version's model card (docs/modelcard.md).
    lines = [line for line in out.splitlines() if "imgclf.champion:" in line]
    assert len(lines) == 2 and "cnn version 2 vs champion version 1 on the same" in lines[0], lines
    assert f"{REGISTERED} version 2: model card written" in lines[1], lines
    assert v2.description.startswith(f"# Model card: {REGISTERED} version 2\n")
    assert "**manual** (compared with version 1): classes differ" in v2.description
    report = (project.path / "reports/report.md").read_text()
    assert "## Champion and challenger" in report and f"| {NEW_CLASS} (new) |" in report
    _commit_all(project, "trained v2")

    # By hand: promote version 2 (same data set, a person's call), then roll back.
    cli = ("python", "-m", "imgclf.champion_cli")
    proc = project.run(*cli, "promote", "2", "--reason", f"{NEW_CLASS} images matter now")
    assert "champion moved from version 1 to version 2 by" in proc.stderr
    proc = project.run(*cli, "rollback", "1", "--reason", "version 2 is worse on the bars")
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "1"
    assert client.get_model_version(REGISTERED, "1").tags["promotion.manual.action"] == "rolled back"
    assert client.get_model_version(REGISTERED, "2").tags["promotion.manual.reason"] == f"{NEW_CLASS} images matter now"

    # The champion changed outside DVC: an unchanged tree still runs nothing, and no decision is
    # made or restored; evaluating the same pair again keeps its record and moves nothing.
    ran, out = _repro(project)
    assert ran == set() and "imgclf.champion" not in out
    before = client.get_model_version(REGISTERED, "2").tags
    ran, out = _repro(project, "-f", "-s", "evaluate@cnn")
    assert ran == {"evaluate@cnn"}
    assert "was compared with champion version 1 on these test images before: manual" in out
    assert f"{REGISTERED} version 2: its model card (compared against 1, these test images) stands" in out
    assert client.get_model_version(REGISTERED, "2").tags == before
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "1"
    assert git(project.path, "status", "--porcelain") == ""

    # The champion on newly arrived images, before any retraining.
    new = tmp_path / "new-images"
    _write(new, "n", per_class=6, seed=9)
    proc = project.run(*cli, "score", str(new))
    assert proc.stdout.startswith(f"models:/{REGISTERED}@champion (version 1) on 18 images of 3 classes in {new}:")
    assert "most confused" in proc.stdout or "no image misclassified" in proc.stdout
    print(proc.stdout)
