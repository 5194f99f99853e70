"""`imgclf-predict`: image files of any size and mode become the model's raw pixels, the
predictions are the model's own, in CSV or JSON; bad input fails in one line with nothing
written; a model from the MLflow registry predicts the same as its checkpoint."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import BIN, ROOT
from imgclf import checkpoint, cli, predict, registry, runlog
from imgclf.config import CNNConfig
from imgclf.models import Classifier, build_model

# A comma and a slash in the names: CSV quoting and file-name-like names must survive.
CLASSES = ["T-shirt/top", "Trouser", "Coat, long", "Bag", "Ankle boot"]
# Height differs from width, so a transposed resize cannot pass.
HEIGHT, WIDTH = 12, 16
REGISTERED = "predict-test-classifier"


def make_checkpoint(path: Path, channels: int = 1, seed: int = 0, resize: str | None = None) -> Path:
    """A small untrained CNN saved as the pipeline saves models (no training: seconds matter)."""
    cfg = CNNConfig(arch="cnn", channels=[4], hidden=8, batch_norm=False)
    shape = (channels, HEIGHT, WIDTH)
    torch.manual_seed(seed)
    model = build_model(cfg, shape, len(CLASSES), log_probs=False)
    with torch.no_grad():
        # Larger weights spread the probabilities: an untrained net is close to uniform, where
        # a wrong image or a swapped row would go unnoticed.
        for p in model.parameters():
            p.mul_(4)
    meta = {"shape": list(shape), "classes": CLASSES, "mean": [0.3] * channels, "std": [0.25] * channels,
            **({"resize": resize} if resize else {})}
    checkpoint.save(path, model, cfg=cfg, meta=meta, loss="cross_entropy", extra={})
    return path


def classifier_of(path: Path) -> Classifier:
    model, state = checkpoint.load(path)
    return Classifier(model, state["mean"], state["std"]).eval()


def model_probabilities(path: Path, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return classifier_of(path)(torch.from_numpy(pixels)).numpy()


def write_images(directory: Path) -> list[Path]:
    """PNG and JPEG files of several sizes and every common mode, with visible structure."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)

    def noise(h, w, *c):
        return rng.integers(0, 256, size=(h, w, *c), dtype=np.uint8)

    rgba = noise(30, 40, 4)
    rgba[..., 3] = np.where(rng.random((30, 40)) < 0.3, 0, 255)  # some fully transparent pixels
    palette = Image.fromarray(noise(20, 20, 3)).quantize(colors=16)
    images = {
        "gray.png": Image.fromarray(noise(HEIGHT, WIDTH), "L"),  # already the model's size
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "photo.jpg": Image.fromarray(noise(48, 64, 3), "RGB"),
        "gray.jpeg": Image.fromarray(noise(50, 30), "L"),
        "palette.png": palette,
        "la.png": Image.fromarray(noise(9, 9, 2), "LA"),
        "tiny.png": Image.fromarray(noise(5, 7, 3), "RGB"),  # smaller than the model's input
    }
    paths = []
    for name, img in images.items():
        img.save(directory / name)
        paths.append(directory / name)
    return paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"))


def run_main(argv: list[str]) -> None:
    predict.main([str(a) for a in argv])


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The command as its console script runs it (cli.run's error contract), in this process."""
    capsys.readouterr()
    try:
        cli.run(lambda: predict.main([str(a) for a in argv]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# --- pixels: what the model is given --------------------------------------------------------------

def _png(path: Path, img: Image.Image) -> Path:
    img.save(path)
    return path


def test_gray_image_of_the_model_size_is_passed_unchanged(tmp_path):
    pixels = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)
    out = predict.load_pixels(_png(tmp_path / "g.png", Image.fromarray(pixels, "L")), (1, HEIGHT, WIDTH))
    assert out.dtype == np.uint8 and out.shape == (1, HEIGHT, WIDTH)
    np.testing.assert_array_equal(out[0], pixels)


def test_resize_keeps_width_and_height_apart(tmp_path):
    # 64 wide, 24 tall: white left half, black right half -> 16 wide, 12 tall, same halves.
    pixels = np.zeros((24, 64), dtype=np.uint8)
    pixels[:, :32] = 255
    out = predict.load_pixels(_png(tmp_path / "wide.png", Image.fromarray(pixels, "L")), (1, HEIGHT, WIDTH))[0]
    assert out.shape == (HEIGHT, WIDTH)
    assert (out[:, :7] == 255).all() and (out[:, 9:] == 0).all()


def test_colour_becomes_luma_for_a_gray_model_and_channels_first_for_an_rgb_model(tmp_path):
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    path = _png(tmp_path / "red.png", Image.fromarray(rgb, "RGB"))
    gray = predict.load_pixels(path, (1, HEIGHT, WIDTH))
    assert (gray == 76).all()  # ITU-R 601-2 luma of pure red: 255 * 299/1000
    colour = predict.load_pixels(path, (3, HEIGHT, WIDTH))
    assert colour.shape == (3, HEIGHT, WIDTH)
    assert (colour[0] == 255).all() and (colour[1:] == 0).all()
    # A gray image for an RGB model: three equal channels.
    grey = predict.load_pixels(_png(tmp_path / "l.png", Image.new("L", (5, 5), 90)), (3, HEIGHT, WIDTH))
    assert (grey == 90).all()


def test_palette_image_uses_its_colours(tmp_path):
    img = Image.new("P", (WIDTH, HEIGHT), 1)
    img.putpalette([0, 0, 0, 200, 200, 200] + [0] * 762)
    assert (predict.load_pixels(_png(tmp_path / "p.png", img), (1, HEIGHT, WIDTH)) == 200).all()


@pytest.mark.parametrize("invert", [False, True])
def test_transparent_pixels_are_black_background_with_or_without_invert(tmp_path, invert):
    # Transparent pixels hold white (as many editors save them); the object is opaque gray 200.
    rgba = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[4:8, 4:12] = (200, 200, 200, 255)
    out = predict.load_pixels(_png(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), (1, HEIGHT, WIDTH), invert)[0]
    obj = np.zeros((HEIGHT, WIDTH), dtype=bool)
    obj[4:8, 4:12] = True
    assert (out[~obj] == 0).all()
    assert (out[obj] == (55 if invert else 200)).all()


def test_invert_flips_gray_levels(tmp_path):
    pixels = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)
    path = _png(tmp_path / "g.png", Image.fromarray(pixels, "L"))
    np.testing.assert_array_equal(predict.load_pixels(path, (1, HEIGHT, WIDTH), invert=True)[0], 255 - pixels)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 100 * 256, 200 * 256 + 255, 65535], dtype=np.uint16)
    deep = np.tile(values, (HEIGHT, WIDTH // 4))
    path = _png(tmp_path / "deep.png", Image.fromarray(deep))
    assert Image.open(path).mode.startswith("I")  # PIL reads it as 16-bit, the case under test
    out = predict.load_pixels(path, (1, HEIGHT, WIDTH))[0]
    np.testing.assert_array_equal(out[0, :4], [0, 100, 200, 255])


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # Stored landscape with a white top half; EXIF orientation 6 means "rotate 90 degrees
    # clockwise to view", so the upright image is portrait with a white right half.
    stored = np.zeros((WIDTH, HEIGHT * 2), dtype=np.uint8)  # 16 tall, 24 wide
    stored[: WIDTH // 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "camera.jpg"
    Image.fromarray(stored, "L").save(path, exif=exif, quality=95)
    out = predict.load_pixels(path, (1, HEIGHT, WIDTH))[0]
    assert out[:, -5:].min() > 200 and out[:, :5].max() < 50


# --- predictions -----------------------------------------------------------------------------------

def test_predictions_are_the_models_on_the_converted_pixels(ckpt, images, tmp_path):
    out = tmp_path / "predictions.json"
    run_main([*images, "--model", ckpt, "--top-k", 3, "--output", out])
    records = json.loads(out.read_text())
    pixels = np.stack([predict.load_pixels(p, (1, HEIGHT, WIDTH)) for p in images])
    expected = model_probabilities(ckpt, pixels)
    assert [r["file"] for r in records] == [str(p) for p in images]
    assert len({r["predicted"] for r in records}) > 1  # the images are told apart, not one answer for all
    for record, probs in zip(records, expected):
        best = np.argsort(-probs, kind="stable")
        assert record["predicted"] == CLASSES[best[0]]
        assert record["probability"] == pytest.approx(probs[best[0]], abs=1e-6)
        top = record["top_k"]
        assert [t["class"] for t in top] == [CLASSES[i] for i in best[:3]]
        assert [t["probability"] for t in top] == pytest.approx(probs[best[:3]], abs=1e-6)
        shown = [t["probability"] for t in top]
        assert shown == sorted(shown, reverse=True) and sum(shown) <= 1 + 1e-5


def test_an_rgb_model_gets_rgb_pixels(images, tmp_path):
    rgb_ckpt = make_checkpoint(tmp_path / "rgb.pt", channels=3)
    out = tmp_path / "p.json"
    run_main([*images, "--model", rgb_ckpt, "--top-k", 1, "--output", out])
    probs = model_probabilities(rgb_ckpt, np.stack([predict.load_pixels(p, (3, HEIGHT, WIDTH)) for p in images]))
    got = [r["probability"] for r in json.loads(out.read_text())]
    assert got == pytest.approx(probs.max(axis=1), abs=1e-6)


def test_csv_and_json_carry_the_same_predictions_and_output_is_deterministic(ckpt, images, tmp_path):
    run_main([*images, "--model", ckpt, "--top-k", 2, "--output", tmp_path / "a.csv"])
    run_main([*images, "--model", ckpt, "--top-k", 2, "--output", tmp_path / "b.csv"])
    run_main([*images, "--model", ckpt, "--top-k", 2, "--output", tmp_path / "p.json"])
    text = (tmp_path / "a.csv").read_text()
    assert text == (tmp_path / "b.csv").read_text()
    rows = read_csv(text)
    assert list(rows[0]) == ["file", "predicted", "probability", "top1", "prob1", "top2", "prob2"]
    records = json.loads((tmp_path / "p.json").read_text())
    for row, record in zip(rows, records, strict=True):
        assert row["file"] == record["file"]
        assert row["predicted"] == row["top1"] == record["predicted"]
        assert float(row["probability"]) == float(row["prob1"]) == record["probability"]
        assert [row["top2"], float(row["prob2"])] == [record["top_k"][1]["class"], record["top_k"][1]["probability"]]
    # --format wins over the file name; without both, CSV.
    run_main([images[0], "--model", ckpt, "--format", "csv", "--output", tmp_path / "c.json"])
    assert (tmp_path / "c.json").read_text().startswith("file,predicted,probability,top1,prob1")


def test_default_model_is_the_workspace_cnn_and_output_goes_to_stdout(ckpt, images, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    (models / "cnn").mkdir(parents=True)
    (models / "cnn" / "model.pt").write_bytes(ckpt.read_bytes())
    monkeypatch.setattr(predict.paths, "MODELS_DIR", models)
    capsys.readouterr()
    run_main(images[:2])
    default = capsys.readouterr().out
    run_main([*images[:2], "--model", ckpt])
    assert default == capsys.readouterr().out
    rows = read_csv(default)
    assert len(rows) == 2 and list(rows[0])[-2:] == ["top3", "prob3"]  # top-3 by default


def test_console_script_prints_csv(ckpt, images):
    proc = subprocess.run([str(BIN / "imgclf-predict"), str(images[0]), str(images[2]), "--model", str(ckpt),
                           "--top-k", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(proc.stdout)
    assert [r["file"] for r in rows] == [str(images[0]), str(images[2])]
    assert all(sorted(r[f"top{i}"] for i in range(1, 6)) == sorted(CLASSES) for r in rows)
    assert "2 images classified" in proc.stderr  # the log goes to stderr, the table to stdout


def test_module_entry_point_fails_in_one_line(ckpt, tmp_path):
    out = tmp_path / "out.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("IMGCLF_DEBUG", None)
    missing = tmp_path / "nope.png"
    proc = subprocess.run([sys.executable, "-m", "imgclf.predict", str(missing), "--model", str(ckpt),
                           "--output", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {missing}: no such file (give PNG or JPEG image files)"]
    assert not out.exists() and proc.stdout == ""


# --- errors: one line, exit 2, nothing written -----------------------------------------------------

def _bad_files(directory: Path) -> dict[str, Path]:
    directory.mkdir(exist_ok=True)
    text = directory / "notes.png"
    text.write_text("not an image\n")
    gif = directory / "anim.gif"
    Image.new("L", (8, 8)).save(gif)
    good = directory / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)).save(good)
    truncated = directory / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200])
    folder = directory / "folder"
    folder.mkdir(exist_ok=True)
    return {"text": text, "gif": gif, "good": good, "truncated": truncated, "folder": folder,
            "missing": directory / "missing.png"}


ERRORS = {
    "missing image": (lambda f, c: [f["missing"]],
                      lambda f, c: f"{f['missing']}: no such file (give PNG or JPEG image files)"),
    "directory": (lambda f, c: [f["good"], f["folder"]],
                  lambda f, c: f"{f['folder']}: is a directory (give PNG or JPEG image files, e.g. {f['folder']}/*.png)"),
    "text file": (lambda f, c: [f["good"], f["text"]],
                  lambda f, c: f"{f['text']}: not a PNG or JPEG image (those are the formats allowed)"),
    "gif": (lambda f, c: [f["gif"]], lambda f, c: f"{f['gif']}: not a PNG or JPEG image (those are the formats allowed)"),
    "truncated": (lambda f, c: [f["truncated"]], lambda f, c: f"{f['truncated']}: damaged or truncated image ("),
    "top-k 0": (lambda f, c: [f["good"], "--top-k", 0],
                lambda f, c: "--top-k 0: must be between 1 and the model's number of classes"),
    "top-k too large": (lambda f, c: [f["good"], "--top-k", 6],
                        lambda f, c: "--top-k 6: must be between 1 and 5 (the model's number of classes)"),
    "missing checkpoint": (lambda f, c: [f["good"], "--model", f["missing"].with_suffix(".pt")],
                           lambda f, c: f"--model {f['missing'].with_suffix('.pt')}: does not exist "
                                        "(give a checkpoint file such as models/cnn/model.pt)"),
    "not a checkpoint": (lambda f, c: [f["good"], "--model", f["good"]],
                         lambda f, c: f"{f['good']}: refused to load: not a plain-data checkpoint ("),
    "unknown workspace model": (lambda f, c: [f["good"], "--name", "resnet"],
                                lambda f, c: f"{c.parent.parent / 'resnet' / 'model.pt'} is missing (trained here: cnn); "
                                             "run `dvc repro`, or pass --model PATH or --model-uri URI"),
    "name with a path": (lambda f, c: [f["good"], "--name", "../cnn"],
                         lambda f, c: "--name '../cnn': use a key under `models` in params.yaml"),
    "bad format": (lambda f, c: [f["good"], "--format", "xml"], lambda f, c: "argument --format: invalid choice: 'xml'"),
    "two models": (lambda f, c: [f["good"], "--model", c, "--model-uri", "models:/x@champion"],
                   lambda f, c: "argument --model-uri: not allowed with argument --model (see imgclf-predict --help)"),
    "no images": (lambda f, c: ["--model", c], lambda f, c: "the following arguments are required: IMAGE"),
    "uri without store": (lambda f, c: [f["good"], "--model-uri", "models:/x@champion"],
                          lambda f, c: f"no MLflow store at {f['folder'] / 'none.db'}: run `dvc repro` first"),
    "uri of a non-model dir": (lambda f, c: [f["good"], "--model-uri", f["folder"]],
                               lambda f, c: f"--model-uri {f['folder']}: {f['folder']} is not an MLflow model "
                                            "directory (it has no MLmodel file)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_fails_in_one_line_and_writes_nothing(case, ckpt, tmp_path, monkeypatch, capsys):
    files = _bad_files(tmp_path / "in")
    models = tmp_path / "models"
    (models / "cnn").mkdir(parents=True)
    workspace = models / "cnn" / "model.pt"
    workspace.write_bytes(ckpt.read_bytes())
    monkeypatch.setattr(predict.paths, "MODELS_DIR", models)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{files['folder'] / 'none.db'}")
    monkeypatch.delenv("IMGCLF_DEBUG", raising=False)
    argv_of, message_of = ERRORS[case]
    argv = argv_of(files, workspace)
    if "--model" not in argv and "--model-uri" not in argv and "--name" not in argv:
        argv = [*argv, "--model", ckpt]
    out = tmp_path / "out" / "predictions.csv"
    code, stdout, stderr = run_cli([*argv, "--output", out], capsys)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message_of(files, workspace)), stderr
    assert stdout == ""
    assert not out.parent.exists()  # not even the output's directory
    assert not (files["folder"] / "none.db").exists()  # no empty MLflow store made as a side effect


def test_output_that_is_a_directory_is_refused(ckpt, images, tmp_path, capsys):
    code, _, stderr = run_cli([images[0], "--model", ckpt, "--output", tmp_path], capsys)
    assert code == 2
    assert stderr.splitlines() == [f"error: --output {tmp_path}: is a directory (give a file name, e.g. predictions.csv)"]


def test_a_failed_run_leaves_an_existing_output_untouched(ckpt, images, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    run_main([images[0], "--model", ckpt, "--output", out])
    before = out.read_bytes()
    code, _, _ = run_cli([images[1], tmp_path / "missing.png", "--model", ckpt, "--output", out], capsys)
    assert code == 2 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary file left


# --- the MLflow registry ------------------------------------------------------------------------------

def register_tiny_model(base: Path, ckpt: Path, name: str) -> tuple[str, str]:
    """Log the checkpoint's classifier as the pipeline does (runlog.log_model), register it
    and crown it champion (registry.register) in a new SQLite store; return (store, run id)."""
    import mlflow
    from mlflow import MlflowClient

    store = f"sqlite:///{base / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        experiment_id = mlflow.create_experiment("predict", artifact_location=(base / "artifacts").as_uri())
        example = np.random.default_rng(0).integers(0, 256, (4, 1, HEIGHT, WIDTH), dtype=np.uint8)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            runlog.log_model(classifier_of(ckpt), example, ROOT / "src" / "imgclf", CLASSES)
        registration = registry.register(run.info.run_id, "cnn", name, 0.5, client=MlflowClient(store))
        assert registration is not None and registration.champion == "1"
    finally:
        mlflow.set_tracking_uri(previous)
    return store, run.info.run_id


@pytest.fixture(scope="module")
def registered(ckpt, tmp_path_factory):
    return register_tiny_model(tmp_path_factory.mktemp("store"), ckpt, REGISTERED)


@pytest.fixture
def store_env(registered, monkeypatch):
    import mlflow

    store, run_id = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    previous = mlflow.get_tracking_uri()
    yield store, run_id
    mlflow.set_tracking_uri(previous)  # predict points MLflow at the store; leave no trace


def test_registry_champion_predicts_what_the_checkpoint_predicts(ckpt, images, store_env, tmp_path):
    _, run_id = store_env
    run_main([*images, "--model", ckpt, "--top-k", 5, "--output", tmp_path / "local.json"])
    local = json.loads((tmp_path / "local.json").read_text())
    for uri in (f"models:/{REGISTERED}@champion", f"runs:/{run_id}/model"):
        run_main([*images, "--model-uri", uri, "--top-k", 5, "--output", tmp_path / "logged.json"])
        logged = json.loads((tmp_path / "logged.json").read_text())
        # Class names come from the logged model's metadata, so they match the checkpoint's.
        assert [r["predicted"] for r in logged] == [r["predicted"] for r in local], uri
        for a, b in zip(logged, local, strict=True):
            assert [t["class"] for t in a["top_k"]] == [t["class"] for t in b["top_k"]], uri
            assert [t["probability"] for t in a["top_k"]] == pytest.approx([t["probability"] for t in b["top_k"]],
                                                                          abs=2e-6), uri


def test_unknown_registered_model_fails_in_one_line(images, store_env, tmp_path, capsys):
    store, _ = store_env
    out = tmp_path / "out.csv"
    code, _, stderr = run_cli([images[0], "--model-uri", "models:/no-such-model@champion", "--output", out], capsys)
    assert code == 2 and not out.exists()
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: --model-uri models:/no-such-model@champion: cannot load a model in the "
                               f"store {store} (")
    assert "no-such-model" in lines[0] and lines[0].endswith("runs:/<run id>/model")


def test_a_model_trained_on_an_image_folder_resizes_as_its_training_images_were(tmp_path):
    """An image folder's resize policy travels in the checkpoint; predict applies it."""
    padded = predict.from_checkpoint(make_checkpoint(tmp_path / "pad.pt", resize="pad"))
    assert padded.resize == "pad"
    assert predict.from_checkpoint(make_checkpoint(tmp_path / "old.pt")).resize == "stretch"  # built-in sets
    tall = tmp_path / "tall.png"
    Image.new("L", (4, 40), 255).save(tall)  # white, far taller than the model's 12x16
    pixels = predict.load_pixels(tall, padded.in_shape, resize=padded.resize)[0]
    assert pixels[:, 0].max() == 0 and pixels[:, -1].max() == 0  # black borders left and right
    assert pixels[:, WIDTH // 2].min() == 255
