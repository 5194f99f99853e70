"""The report stage's loading, figures and HTML/Markdown, on tiny fake pipeline outputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from imgclf.config import ReportConfig
from imgclf.errors import DataError
from imgclf.report import Report, ReportInputs, build_report, load_inputs

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CFG = ReportConfig(samples_per_class=2, prediction_grid=12)


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def make_outputs(root: Path, models: list[str], shape: tuple[int, int, int] = (1, 28, 28),
                 per_class: int = 3, classes: list[str] = CLASSES,
                 meta_extra: dict | None = None) -> tuple[Path, Path, dict[str, float]]:
    """Processed data and per-model metrics as the pipeline writes them; returns the test accuracies."""
    rng = np.random.default_rng(0)
    processed, metrics = root / "processed", root / "metrics"
    processed.mkdir(parents=True)
    labels = np.tile(np.arange(len(classes), dtype=np.int64), per_class)
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    for split in ("train", "test"):
        np.save(processed / f"{split}_images.npy", images)
        np.save(processed / f"{split}_labels.npy", labels)
    _write_json(processed / "meta.json", {
        "dataset": "fashion_mnist", "classes": classes, "shape": list(shape), "mean": [0.286] * shape[0],
        "std": [0.353] * shape[0], "counts": {"train": len(labels), "val": 0, "test": len(labels)},
        "val_fraction": 0.1, "seed": 42, **(meta_extra or {})})
    accuracies = {}
    for k, name in enumerate(models):
        folder = metrics / name
        predicted = labels.copy()
        wrong = np.arange(k, len(labels), 3 + k)  # a different, known set of mistakes per model
        predicted[wrong] = (labels[wrong] + 1) % len(classes)
        confidence = np.round(np.linspace(0.99, 0.4, len(labels)), 6)
        accuracies[name] = float(np.mean(predicted == labels))
        cm = np.bincount(labels * len(classes) + predicted, minlength=len(classes) ** 2).reshape(len(classes), -1)
        folder.mkdir(parents=True)
        (folder / "history.csv").write_text(
            "epoch,lr,train/loss,train/accuracy,val/loss,val/accuracy\n"
            + "".join(f"{e},0.1,{1.5 / e:.6f},{0.5 + 0.1 * e:.6f},{1.2 / e:.6f},{0.55 + 0.1 * e:.6f}\n"
                      for e in (1, 2, 3)), encoding="utf-8")
        _write_json(folder / "train.json", {"best_epoch": 3, "val/loss": 0.4, "val/accuracy": 0.85,
                                            "parameters": 1000 * (k + 1), "epochs": 3})
        _write_json(folder / "timing.json", {"train_seconds": 12.34, "epoch_seconds": [4.1, 4.1, 4.1],
                                             "images_per_s": 3900.0, "threads": 2, "precision": "fp32",
                                             "device": "cpu", "processes": 1, "machine": "x86_64", "torch": "2.14.1"})
        _write_json(folder / "test.json", {
            "test/loss": 0.5, "test/accuracy": accuracies[name], "test/images": len(labels),
            "test/per_class_accuracy": {c: float(cm[i, i] / cm[i].sum()) for i, c in enumerate(classes)}})
        _write_json(folder / "confusion.json", {"classes": classes, "counts": cm.tolist()})
        _write_json(folder / "misclassified.json", [
            {"index": int(i), "actual": classes[labels[i]], "predicted": classes[predicted[i]],
             "confidence": float(confidence[i])} for i in wrong[:5]])
        (folder / "predictions.csv").write_text(
            "index,actual,predicted,confidence\n"
            + "".join(f"{i},{classes[a]},{classes[p]},{c:.6f}\n"
                      for i, (a, p, c) in enumerate(zip(labels, predicted, confidence))), encoding="utf-8")
    return processed, metrics, accuracies


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking its signature and final chunk."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportInputs, Report, dict[str, float]]:
    processed, metrics, accuracies = make_outputs(tmp_path_factory.mktemp("two"), ["mlp", "cnn"])
    inputs = load_inputs(["mlp", "cnn"], processed, metrics)
    links = {"mlp": "run 3f2a91 in experiment fashion-mnist-lesson", "cnn": None}
    return inputs, build_report(inputs, CFG, links), accuracies


def test_html_is_self_contained_and_shows_every_model_and_class(two_models):
    _, report, accuracies = two_models
    page = report.html
    for name, accuracy in accuracies.items():
        assert f"<td class=\"l\">{name}</td>" in page
        assert f"{100 * accuracy:.2f}%" in page
    for name in CLASSES:
        assert name in page
    assert "run 3f2a91 in experiment fashion-mnist-lesson" in page and "not recorded" in page
    assert page.count('src="data:image/png;base64,') == len(report.figures)
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    # The MLP is given more mistakes, so the prediction grid must use the CNN and say so.
    assert max(accuracies, key=accuracies.get) == "cnn"
    assert "as classified by cnn, the model with the highest test accuracy" in page


def test_sections_come_in_teaching_order(two_models):
    page = two_models[1].html
    headings = ["How the two models see an image", "The data", "Model comparison", "Training curves",
                "Accuracy per class", "Confusion matrices", "Predictions on test images",
                "Most confident mistakes", "<footer>"]
    positions = [page.index(h) for h in headings]
    assert positions == sorted(positions)
    footer = page[page.index("<footer>"):]
    assert "seed 42" in footer and "0.1 of the training images" in footer and "PyTorch 2.14.1" in footer


def test_every_figure_is_a_png_that_markdown_references(two_models):
    report = two_models[1]
    assert set(report.figures) == {
        "samples.png", "curves.png", "per_class.png", "confusion_mlp.png", "confusion_cnn.png",
        "predictions.png", "misclassified_mlp.png", "misclassified_cnn.png"}
    for name, data in report.figures.items():
        width, height = _png_size(data)
        assert width > 300 and height > 50, name
        assert f"](figures/{name})" in report.markdown
    assert "| mlp | 1,000 | 3 of 3 |" in report.markdown


def test_building_twice_gives_identical_bytes(two_models):
    inputs, first, _ = two_models
    second = build_report(inputs, CFG, {"mlp": "run 3f2a91 in experiment fashion-mnist-lesson", "cnn": None})
    assert second.html == first.html
    assert second.markdown == first.markdown
    assert second.figures == first.figures


def test_missing_test_json_names_the_file(tmp_path):
    processed, metrics, _ = make_outputs(tmp_path, ["mlp", "cnn"])
    (metrics / "cnn" / "test.json").unlink()
    with pytest.raises(DataError, match=r"cnn/test\.json is missing: run `dvc repro`"):
        load_inputs(["mlp", "cnn"], processed, metrics)


@pytest.mark.parametrize("file, content, problem", [
    ("confusion.json", '{"classes": [], "counts": []}', "matrix"),
    ("train.json", "{not json", "unreadable"),
    ("timing.json", '{"train_seconds": "fast"}', "'train_seconds' has the wrong type"),
    ("predictions.csv", "index,actual,predicted,confidence\n0,Bag,Hat,0.5\n", "rows naming known classes"),
    ("history.csv", "epoch,loss\n1,0.5\n", "expected the columns"),
])
def test_malformed_file_is_a_one_line_data_error(tmp_path, file, content, problem):
    processed, metrics, _ = make_outputs(tmp_path, ["mlp"])
    (metrics / "mlp" / file).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_inputs(["mlp"], processed, metrics)
    message = str(caught.value)
    assert file in message and problem in message and "dvc repro" in message and "\n" not in message


def test_hostile_model_name_is_escaped_and_three_models_work(tmp_path):
    names = ["mlp", "cnn", "<script>alert(1)</script>"]
    processed, metrics, _ = make_outputs(tmp_path, names)
    report = build_report(load_inputs(names, processed, metrics), CFG, {})
    assert "<script>" not in report.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report.html
    assert "<script>" not in report.markdown
    hostile = [f for f in report.figures if "alert" in f]
    assert hostile == ["confusion_script-alert-1-script.png", "misclassified_script-alert-1-script.png"]
    assert report.html.count('src="data:image/png;base64,') == 3 + 3 + 1 + 3


def test_single_model_with_colour_32x32_images(tmp_path):
    processed, metrics, accuracies = make_outputs(tmp_path, ["resnet"], shape=(3, 32, 32), per_class=2)
    report = build_report(load_inputs(["resnet"], processed, metrics), CFG, {"resnet": None})
    assert set(report.figures) == {"samples.png", "curves.png", "per_class.png", "confusion_resnet.png",
                                   "predictions.png", "misclassified_resnet.png"}
    assert all(_png_size(data) for data in report.figures.values())
    assert f"{100 * accuracies['resnet']:.2f}%" in report.html
    assert "3×32×32 grid becomes a single list of 3072 numbers" in report.html


def test_many_classes_keep_the_report_readable_and_it_states_the_data_version(tmp_path):
    classes = [f"class-{i:02d}" for i in range(45)]
    version = {"dvc_md5": "0123456789abcdef0123.dir", "content_sha256": "f" * 64}
    counts = {s: {c: 3 for c in classes} for s in ("train", "val", "test")}
    processed, metrics, _ = make_outputs(tmp_path, ["cnn"], per_class=3, classes=classes, meta_extra={
        "format": "folder", "title": "My photos", "version": version, "counts_per_class": counts,
        "source": {"kind": "dvc add", "path": "data/images/mine"}, "duplicates": 2,
        "skipped": [{"path": "a/b.png", "reason": "empty file"}]})
    report = build_report(load_inputs(["cnn"], processed, metrics), CFG, {"cnn": None})
    # No figure with one row or column per class: the hardest classes and most confused pairs instead.
    assert sorted(report.figures) == ["curves.png", "misclassified_cnn.png", "predictions.png", "samples.png"]
    md = report.markdown
    assert md.startswith("# My photos: cnn")
    assert "Version: DVC hash 0123456789abcdef (source: dvc add, data/images/mine)." in md
    assert "1 bad file(s) skipped: a/b.png (empty file). 2 exact duplicate file(s) left out" in md
    assert "(the first 30 of 45 classes)" in md
    assert "The 20 classes cnn finds hardest" in md and "| Actual | Predicted | Test images |" in md
    assert "by content hash" in md


def test_the_report_states_blank_images_and_near_duplicates_across_splits(tmp_path):
    blank = {"count": 3, "share": 0.0375, "images": 80, "transparent": 40, "transparent_blank": 1,
             "opaque_share": 0.05, "limit": 0.1, "transparency": "auto", "examples": ["a/1.png"]}
    near = {"action": "keep_together", "groups": 4, "images": 9, "groups_across_splits": 2, "left_out": 2,
            "examples": [[{"path": "a/1.png", "split": "test"}, {"path": "a/1-big.png", "split": "train"}]]}
    processed, metrics, _ = make_outputs(tmp_path, ["cnn"], meta_extra={
        "format": "folder", "blank_images": blank, "near_duplicates": near})
    md = build_report(load_inputs(["cnn"], processed, metrics), CFG, {"cnn": None}).markdown
    assert ("3 of 80 images (3.8%) come out (nearly) uniform after preprocessing; 40 had transparency, "
            "composited on the background that contrasts with each image.") in md
    assert ("4 near-duplicate group(s) (resized or re-encoded copies), 2 of them across splits: 2 image(s) left "
            "out so that each group is used in one split. E.g. a/1.png (test), a/1-big.png (train).") in md
