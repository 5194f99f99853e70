"""Your own images, versioned: the workflow of README's "Your own images", end to end.

A tiny image folder (three classes of real PNG and JPEG files, gray and RGB, 16x16, a bright
bar whose row is the class) is tracked with `dvc add`, trained on (version 1), grown and
partly relabelled (version 2), then rolled back to version 1, which DVC's run cache restores
without training. The same folder then comes from a data-registry repository through
`dvc import` / `dvc update`. A damaged file stops preprocessing in one line, and
`bad_files: skip` leaves it out.

The version-1 project is trained once per module (`v1`); every later step works on a copy of
it (or, for the registry, on a project of its own), so the tests do not depend on their order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures import ONE_MODEL, TINY, Project, git, make_project, set_params
from imgclf.data.folder import split_of
from imgclf.dvcfiles import stages_in

pytestmark = pytest.mark.slow

NAME = "bars"
FOLDER = f"data/images/{NAME}"
DVC_FILE = f"{FOLDER}.dvc"
SIZE = 16
CLASSES = ("high", "middle", "low")  # class k: a bright bar at rows 1 + 5k .. 4 + 5k
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2
SEED = 42
MODELS = ONE_MODEL  # what is under test is the data's journey, the same for every model
TRAIN_STAGES = {f"train@{m}" for m in MODELS}
AFTER_DATA = {"preprocess", "report", *TRAIN_STAGES, *(f"evaluate@{m}" for m in MODELS)}
ALL_STAGES = {"validate", "download", *AFTER_DATA}


# The data ----------------------------------------------------------------------------------

def _image_bytes(k: int, rng: np.random.Generator, fmt: str) -> bytes:
    """One learnable image of class k: noise, and a bright bar in the class's rows. PNGs are
    gray, JPEGs RGB (tinted, so converting to one channel does real work)."""
    pixels = rng.integers(0, 50, size=(SIZE, SIZE)).astype(np.float64)
    pixels[1 + 5 * k : 5 + 5 * k, 2 : SIZE - 2] = rng.integers(190, 256)
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels.astype(np.uint8), "L").save(buf, "PNG")
    else:
        rgb = np.stack([pixels, pixels * 0.85, pixels * 0.7], axis=-1)
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _split(data: bytes) -> str:
    return split_of(hashlib.sha256(data).hexdigest(), SEED, VAL_FRACTION, TEST_FRACTION)


def write_images(folder: Path, prefix: str, per_class: int, seed: int, min_per_split: int = 0) -> list[str]:
    """Write `per_class` images into each class folder (more where needed so that every class
    has `min_per_split` images in each of train/val/test: the split comes from the content,
    and a JPEG's bytes depend on the libjpeg that wrote them). Return their paths below `folder`."""
    rng = np.random.default_rng(seed)
    written = []
    for k, cls in enumerate(CLASSES):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        per_split = {"train": 0, "val": 0, "test": 0}
        i = 0
        while i < per_class or min(per_split.values()) < min_per_split:
            assert i < 20 * per_class, "could not fill every split"
            fmt = "png" if i % 2 == 0 else "jpg"
            data = _image_bytes(k, rng, fmt)
            rel = f"{cls}/{prefix}{i:03d}.{fmt}"
            (folder / rel).write_bytes(data)
            per_split[_split(data)] += 1
            written.append(rel)
            i += 1
    return written


def folder_params(params: dict) -> None:
    """TINY's pipeline on the image folder."""
    params["download"]["dataset"] = NAME
    params["datasets"][NAME] = {
        "title": "Bars", "folder": FOLDER, "image_size": [SIZE, SIZE], "channels": 1,
        "resize": "pad", "test_fraction": TEST_FRACTION, "bad_files": "error",
        "augment": {"shift": 0, "flip": False},
    }
    params["preprocess"].update(val_fraction=VAL_FRACTION, seed=SEED)
    # TINY's CNN; a few more epochs of smaller batches: there are ~45 training images.
    params["train"].update(TINY["train"], epochs=6, batch_size=16)
    params.update({k: TINY[k] for k in ("evaluate", "report")})
    params["models"] = {name: TINY["models"][name] for name in MODELS}
    assert params["mlflow"]["register_model"] in MODELS


# Helpers -----------------------------------------------------------------------------------

def _output(proc) -> str:
    return proc.stdout + proc.stderr


def _repro(project: Project) -> dict[str, set[str]]:
    out = _output(project.run("dvc", "repro"))
    return {k: set(v) for k, v in stages_in(out).items()}


def _commit_all(project: Project, message: str) -> str:
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", message)
    assert git(project.path, "status", "--porcelain") == "", "something was left uncommitted"
    return git(project.path, "rev-parse", "HEAD")


def _copy(project: Project, dest: Path) -> Project:
    """A full copy of a workspace: git history, outputs, .dvc/cache with its run cache (the
    MLflow store stays the one of the original)."""
    shutil.copytree(project.path, dest, symlinks=True)
    return Project(dest, project.env)


def _dvc_md5(repo: Path, dvc_file: str = DVC_FILE) -> str:
    md5 = yaml.safe_load((repo / dvc_file).read_text())["outs"][0]["md5"]
    assert md5.endswith(".dir"), md5  # a folder's hash
    return md5


def _lock_md5(repo: Path, path: str) -> str:
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (md5,) = {o["md5"] for s in stages.values() for o in s.get("outs", []) if o["path"] == path}
    return md5


def _meta(repo: Path) -> dict:
    return json.loads((repo / "data/processed/meta.json").read_text())


def _manifest(repo: Path) -> list[dict[str, str]]:
    with (repo / "data/processed/manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _track(project: Project, message: str) -> str:
    """`dvc add` the folder, commit the .dvc file and its .gitignore; return the commit."""
    project.run("dvc", "add", FOLDER)
    project.run("git", "add", DVC_FILE, "data/images/.gitignore")
    project.run("git", "commit", "-qm", message)
    return git(project.path, "rev-parse", "HEAD")


def _runs(project: Project, source_version: str):
    """The MLflow runs (one per model: training, then evaluation resumes it) tagged with
    this version of the image folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=project.env["MLFLOW_TRACKING_URI"])
    experiment = yaml.safe_load((project.path / "params.yaml").read_text())["mlflow"]["experiment"]
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.data_source_version = '{source_version}'")


def _check_runs(project: Project, source_version: str, source: dict) -> list[str]:
    """Every model has a run recording this data version: tags and a dataset input whose
    digest starts with it; return the run ids."""
    runs = _runs(project, source_version)
    assert sorted(r.data.tags.get("model_name") for r in runs) == sorted(MODELS), \
        [(r.info.run_id, r.data.tags.get("model_name")) for r in runs]
    processed = _lock_md5(project.path, "data/processed")
    for run in runs:
        assert run.data.tags["data_source_version"] == source_version
        assert run.data.tags["data_version"] == processed, run.data.tags
        inputs = run.inputs.dataset_inputs
        assert inputs, f"run {run.info.run_id} has no dataset input"
        contexts = set()
        for di in inputs:
            ds = di.dataset
            assert ds.name == NAME
            assert ds.digest.startswith(source_version[:17]), (ds.digest, source_version)
            assert processed.startswith(ds.digest.split("-", 1)[1]), (ds.digest, processed)
            assert json.loads(ds.source) == source, ds.source
            profile = json.loads(ds.profile)
            assert profile["version"]["dvc_md5"] == source_version, profile
            assert profile["counts"] == _meta(project.path)["counts"], profile
            contexts |= {t.value for t in di.tags if t.key == "mlflow.data.context"}
        assert "training" in contexts, contexts
    return [r.info.run_id for r in runs]


def _check_learned(project: Project) -> None:
    # Three classes: chance is 1/3. A decoding or labelling mistake would leave a model there.
    for model in MODELS:
        acc = json.loads((project.path / f"metrics/{model}/test.json").read_text())["test/accuracy"]
        assert acc >= 0.75, f"{model}: test accuracy {acc} on the bars; the images did not reach it right"


# Version 1 ---------------------------------------------------------------------------------

@dataclass
class Version:
    project: Project
    commit: str
    md5: str
    images: list[str]
    meta: dict
    manifest: list[dict[str, str]]
    ran: set[str]
    run_ids: list[str]


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Version:
    """A user's first version: images written, `dvc add`ed, committed, `dvc repro`ed."""
    proj = make_project(tmp_path_factory.mktemp("folder-v1"), folder_params)
    images = write_images(proj.path / FOLDER, "a", per_class=20, seed=1, min_per_split=3)
    commit = _track(proj, "images, version 1")
    ran = _repro(proj)["ran"]
    _commit_all(proj, "trained on version 1")
    md5 = _dvc_md5(proj.path)
    run_ids = [r.info.run_id for r in _runs(proj, md5)]
    return Version(proj, commit, md5, images, _meta(proj.path), _manifest(proj.path), ran, run_ids)


def test_version_1_trains_every_stage_and_records_the_folder_version(v1):
    assert v1.ran == ALL_STAGES
    tracked = git(v1.project.path, "ls-files").splitlines()
    assert DVC_FILE in tracked and "data/images/.gitignore" in tracked
    assert not [p for p in tracked if p.startswith(f"{FOLDER}/")], "the images themselves went into git"

    meta = v1.meta
    assert meta["dataset"] == NAME and meta["title"] == "Bars" and meta["format"] == "folder"
    assert meta["classes"] == sorted(CLASSES)
    assert meta["shape"] == [1, SIZE, SIZE]
    assert meta["source"] == {"kind": "dvc add", "path": FOLDER}
    assert meta["version"]["dvc_md5"] == v1.md5
    assert meta["skipped"] == [] and meta["duplicates"] == 0
    assert meta["test_fraction"] == TEST_FRACTION and meta["resize"] == "pad"
    assert sum(meta["counts"].values()) == len(v1.images)

    # The manifest: every file once, with its class (its folder), its content hash, and the
    # split that hash decides; the arrays hold exactly the manifest's splits.
    rows = {r["path"]: r for r in v1.manifest}
    assert sorted(rows) == sorted(v1.images)
    processed = v1.project.path / "data/processed"
    by_split: dict[str, dict[str, int]] = {s: {c: 0 for c in sorted(CLASSES)} for s in ("train", "val", "test")}
    for path, row in rows.items():
        data = (v1.project.path / FOLDER / path).read_bytes()
        assert row["class"] == path.split("/")[0]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["split"] == _split(data) and row["note"] == ""
        by_split[row["split"]][row["class"]] += 1
    assert meta["counts_per_class"] == by_split
    for split in ("train", "val", "test"):
        images = np.load(processed / f"{split}_images.npy")
        labels = np.load(processed / f"{split}_labels.npy")
        assert images.shape == (meta["counts"][split], 1, SIZE, SIZE) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=3).tolist() == [by_split[split][c] for c in meta["classes"]]
        # The bar is where the class says, in PNGs and converted JPEGs alike.
        for image, label in zip(images, labels):
            k = CLASSES.index(meta["classes"][label])
            rows_mean = image[0].mean(axis=1)
            assert int(np.argmax(rows_mean)) in range(1 + 5 * k, 5 + 5 * k)

    _check_learned(v1.project)
    assert sorted(_check_runs(v1.project, v1.md5, meta["source"])) == sorted(v1.run_ids)


# Version 2 ---------------------------------------------------------------------------------

@dataclass
class Version2(Version):
    moved_from: str
    moved_to: str


@pytest.fixture(scope="module")
def v2(v1, tmp_path_factory) -> Version2:
    """More images, one image moved to another class, `dvc add`, `dvc repro`."""
    proj = _copy(v1.project, tmp_path_factory.mktemp("folder-v2") / "repo")
    folder = proj.path / FOLDER
    added = write_images(folder, "b", per_class=6, seed=2)
    moved_from = next(p for p in v1.images if p.startswith("high/"))
    moved_to = f"middle/relabelled-{Path(moved_from).name}"
    (folder / moved_from).rename(folder / moved_to)
    commit = _track(proj, "images, version 2")
    ran = _repro(proj)["ran"]
    _commit_all(proj, "trained on version 2")
    md5 = _dvc_md5(proj.path)
    images = sorted({*v1.images, *added} - {moved_from} | {moved_to})
    run_ids = [r.info.run_id for r in _runs(proj, md5)]
    return Version2(proj, commit, md5, images, _meta(proj.path), _manifest(proj.path), ran, run_ids,
                    moved_from, moved_to)


def test_version_2_reruns_preprocess_onwards_and_moves_no_version_1_image(v1, v2):
    assert v2.ran == AFTER_DATA  # validate and download had nothing new to do
    assert sum(v2.meta["counts"].values()) == len(v2.images) == len(v1.images) + 6 * len(CLASSES)
    assert v2.md5 != v1.md5 and v2.meta["version"]["dvc_md5"] == v2.md5
    assert v2.meta["version"]["content_sha256"] != v1.meta["version"]["content_sha256"]

    old = {r["path"]: r for r in v1.manifest}
    new = {r["path"]: r for r in v2.manifest}
    assert sorted(new) == v2.images
    kept = [p for p in old if p in new]
    assert len(kept) == len(v1.images) - 1
    moved_split = [p for p in kept if new[p]["split"] != old[p]["split"]]
    assert not moved_split, f"version-1 images changed split: {moved_split}"
    assert all(new[p]["sha256"] == old[p]["sha256"] and new[p]["class"] == old[p]["class"] for p in kept)

    before, after = old[v2.moved_from], new[v2.moved_to]
    assert after["sha256"] == before["sha256"]
    assert after["split"] == before["split"], "the relabelled image changed split"
    assert (before["class"], after["class"]) == ("high", "middle")

    # The new runs are new, and record version 2.
    assert sorted(_check_runs(v2.project, v2.md5, v2.meta["source"])) == sorted(v2.run_ids)
    assert not set(v2.run_ids) & set(v1.run_ids)
    _check_learned(v2.project)


def test_back_to_version_1_restores_its_models_from_the_run_cache(v1, v2, tmp_path):
    from mlflow.tracking import MlflowClient

    from imgclf.tracking import file_sha256

    proj = _copy(v2.project, tmp_path / "repo")
    proj.run("git", "checkout", v1.commit, "--", DVC_FILE)
    proj.run("dvc", "checkout")
    assert _dvc_md5(proj.path) == v1.md5
    assert sorted(str(p.relative_to(proj.path / FOLDER)) for p in (proj.path / FOLDER).rglob("*")
                  if p.is_file()) == sorted(v1.images)

    out = _output(proj.run("dvc", "repro"))
    stages = stages_in(out)
    assert not TRAIN_STAGES & set(stages["ran"]), out
    assert TRAIN_STAGES <= set(stages["restored_from_run_cache"]), out
    assert "epoch 1/" not in out, out
    assert _meta(proj.path) == v1.meta
    client = MlflowClient(tracking_uri=proj.env["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_run(v1.run_ids[0]).info.experiment_id
    for model in MODELS:
        restored = proj.path / f"models/{model}/model.pt"
        assert restored.read_bytes() == (v1.project.path / f"models/{model}/model.pt").read_bytes(), model
        # The restored model still leads to the run that trained it on version 1.
        runs = client.search_runs([experiment_id], filter_string=f"tags.model_sha256 = '{file_sha256(restored)}'")
        assert [r.info.run_id for r in runs if r.info.run_id in v1.run_ids], model
        assert all(r.data.tags["data_source_version"] == v1.md5 for r in runs)
    assert "Data and pipelines are up to date." in proj.run("dvc", "status").stdout


# A data registry ---------------------------------------------------------------------------

REGISTRY_PATH = "datasets/bars"


@dataclass
class Registry:
    path: Path
    revs: dict[str, str]  # tag -> commit
    images: dict[str, list[str]]


def _make_registry(base: Path, env: dict[str, str]) -> Registry:
    """A second git + DVC repository holding the folder: tags v1 and v2 (v2 adds images),
    each pushed to its default remote, a local directory."""
    reg = Project(base / "registry", env)
    reg.path.mkdir()
    reg.run("git", "init", "-q")
    reg.run("dvc", "init", "-q")
    reg.run("dvc", "config", "core.analytics", "false")
    reg.run("dvc", "remote", "add", "-d", "storage", str(base / "storage"))
    first = write_images(reg.path / REGISTRY_PATH, "r", per_class=20, seed=3, min_per_split=3)
    revs, images = {}, {"v1": first}
    for tag, message in (("v1", "bars: first images"), ("v2", "bars: more images")):
        if tag == "v2":
            images["v2"] = first + write_images(reg.path / REGISTRY_PATH, "s", per_class=5, seed=4)
        reg.run("dvc", "add", REGISTRY_PATH)
        reg.run("git", "add", "-A")
        reg.run("git", "commit", "-qm", message)
        reg.run("git", "tag", tag)
        reg.run("dvc", "push")
        revs[tag] = git(reg.path, "rev-parse", "HEAD")
    # Everything a consumer gets now comes through git and the remote.
    shutil.rmtree(reg.path / ".dvc" / "cache")
    return Registry(reg.path, revs, images)


def test_folder_imported_from_a_data_registry_then_updated(tmp_path):
    proj = make_project(tmp_path, folder_params)
    registry = _make_registry(tmp_path, proj.env)
    (proj.path / "data/images").mkdir(parents=True, exist_ok=True)
    proj.run("dvc", "import", str(registry.path), REGISTRY_PATH, "-o", FOLDER, "--rev", "v1")
    proj.run("git", "add", DVC_FILE, "data/images/.gitignore")
    proj.run("git", "commit", "-qm", "import bars v1")
    assert sorted(str(p.relative_to(proj.path / FOLDER)) for p in (proj.path / FOLDER).rglob("*")
                  if p.is_file()) == sorted(registry.images["v1"])
    # Up to preprocess only: training on rev v1 would cost ~30 s of CPU and prove nothing
    # that training on rev v2 below does not.
    ran = stages_in(_output(proj.run("dvc", "repro", "preprocess")))["ran"]
    assert set(ran) == {"validate", "download", "preprocess"}
    meta = _meta(proj.path)
    source = {"kind": "dvc import", "path": FOLDER, "repo": str(registry.path), "repo_path": REGISTRY_PATH,
              "rev": registry.revs["v1"]}
    assert meta["source"] == source
    md5 = _dvc_md5(proj.path)
    assert meta["version"]["dvc_md5"] == md5
    assert sum(meta["counts"].values()) == len(registry.images["v1"])
    assert sorted(r["path"] for r in _manifest(proj.path)) == sorted(registry.images["v1"])
    _commit_all(proj, "preprocessed bars v1")

    proj.run("dvc", "update", "--rev", "v2", DVC_FILE)
    assert _repro(proj)["ran"] == AFTER_DATA  # validate and download: nothing new for them
    meta2 = _meta(proj.path)
    assert meta2["source"] == {**source, "rev": registry.revs["v2"]}
    md5_2 = _dvc_md5(proj.path)
    assert md5_2 != md5 and meta2["version"]["dvc_md5"] == md5_2
    assert sum(meta2["counts"].values()) == len(registry.images["v2"]) > len(registry.images["v1"])
    _check_runs(proj, md5_2, meta2["source"])
    _check_learned(proj)


# A bad file --------------------------------------------------------------------------------

BAD = "middle/broken.png"


def _with_truncated_png(v1: Version, dest: Path) -> Project:
    """A copy of version 1 with a PNG cut in half added to a class folder, `dvc add`ed."""
    proj = _copy(v1.project, dest)
    whole = _image_bytes(1, np.random.default_rng(9), "png")
    (proj.path / FOLDER / BAD).write_bytes(whole[: len(whole) // 2])
    _track(proj, "a damaged image")
    return proj


def test_a_truncated_image_stops_preprocess_in_one_line_leaving_the_processed_data(v1, tmp_path):
    proj = _with_truncated_png(v1, tmp_path / "repo")
    processed = proj.path / "data/processed"
    before = _tree_digest(processed)
    assert before and before == _tree_digest(v1.project.path / "data/processed")

    proc = proj.run("dvc", "repro", check=False)
    out = _output(proc)
    assert proc.returncode != 0, out
    assert stages_in(out)["ran"] == ["preprocess"], out  # nothing after it ran on the damaged data
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    assert f"1 bad file(s): {BAD}: damaged or truncated image" in errors[0], errors[0]
    assert "bad_files: skip" in errors[0], errors[0]  # and says how to go on
    assert "Traceback" not in out, out
    assert _lock_md5(proj.path, "data/processed") == _lock_md5(v1.project.path, "data/processed")
    assert _tree_digest(processed) == before, (
        "the failed preprocess did not leave the previous data/processed in place "
        f"(now: {sorted(_tree_digest(processed))})")


def test_bad_files_skip_leaves_the_truncated_image_out_and_lists_it(v1, tmp_path):
    proj = _with_truncated_png(v1, tmp_path / "repo")
    set_params(proj.path, lambda p: p["datasets"][NAME].update(bad_files="skip"))
    # Preprocess is what reads the folder; what follows it only reads data/processed (and
    # would retrain on the new meta.json: time this test has no need to spend).
    ran = stages_in(_output(proj.run("dvc", "repro", "preprocess")))["ran"]
    assert "preprocess" in ran
    meta = _meta(proj.path)
    assert [s["path"] for s in meta["skipped"]] == [BAD], meta["skipped"]
    assert meta["skipped"][0]["reason"].startswith("damaged or truncated image"), meta["skipped"]
    assert meta["counts"] == v1.meta["counts"]
    # The images used are exactly version 1's: the same content digest, the same arrays.
    assert meta["version"]["content_sha256"] == v1.meta["version"]["content_sha256"]
    assert meta["version"]["dvc_md5"] == _dvc_md5(proj.path) != v1.md5
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            name = f"data/processed/{split}_{kind}.npy"
            assert (proj.path / name).read_bytes() == (v1.project.path / name).read_bytes(), name
    rows = {r["path"]: r for r in _manifest(proj.path)}
    assert rows[BAD]["split"] == "" and rows[BAD]["sha256"] == ""
    assert rows[BAD]["note"].startswith("skipped: damaged or truncated image"), rows[BAD]
    assert {p: r for p, r in rows.items() if p != BAD} == {r["path"]: r for r in v1.manifest}
