"""`imgclf-predict`: classify image files with a trained model; CSV or JSON out.

    imgclf-predict IMAGE... [--name NAME | --model PATH | --model-uri URI] [--top-k K]
                   [--format csv|json] [--output FILE] [--invert]

The model is the workspace's `models/<name>/model.pt` (`--name`, default `cnn`), any
checkpoint file (`--model`), or any MLflow model URI (`--model-uri models:/<name>@champion`,
`runs:/<run id>/model`), resolved against MLFLOW_TRACKING_URI or the project's own store.

Images (PNG or JPEG, any size and mode) become what the model was trained on: turned upright
by their EXIF orientation, transparent pixels made background, converted to the model's
channels (grayscale or RGB), resized to its height and width (bilinear, stretched, not
cropped), as raw uint8 pixels (N, C, H, W); the model normalizes them itself. Fashion-MNIST
shows light objects on a black background; nothing is inverted unless `--invert` says so
(for dark objects photographed on a light background). docs/serving.md has examples.

Every image is read, and every value checked, before anything is written: on a bad input the
command prints one `error: ...` line, exits 2 and leaves no output file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from imgclf import checkpoint, cli, paths, tracking
from imgclf.atomic import write_text
from imgclf.config import MODEL_NAME, MODEL_NAME_RULE, is_transparency_rule
from imgclf.data import images
from imgclf.data.images import DEFAULT_RESIZE
from imgclf.errors import ConfigError, DataError, TrackingError
from imgclf.models import Classifier
from imgclf.redact import is_utf8, printable
from imgclf.schema import CHECKPOINT, ModelFiles

log = logging.getLogger(__name__)

PROG = "imgclf-predict"
DEFAULT_NAME = "cnn"
DEFAULT_TOP_K = 3
# Only these decoders run: every other PIL plugin is attack surface a classifier does not need.
FORMATS = ("PNG", "JPEG")
BATCH = 256  # images per forward pass: bounds memory for long file lists
DECIMALS = 6  # probabilities in the output; fixed, so the same input gives the same bytes
# The scheme of every URI that names a model by the tracking store (the rest are locations).
STORE_SCHEMES = ("models:", "runs:")


@dataclass(frozen=True)
class Predictor:
    """A loaded model: what it expects, its class names, and raw pixels -> probabilities."""

    source: str
    in_shape: tuple[int, int, int]
    classes: list[str]  # empty when a logged model does not name them: indices are used then
    probabilities: Callable[[np.ndarray], np.ndarray]
    resize: str = DEFAULT_RESIZE  # how the training images were resized (imgclf.data.images)
    transparency: str = images.LEGACY_TRANSPARENCY  # how their transparency became pixels


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus a message and exits; ours is the one-line contract of cli.run.
        raise ConfigError(f"{message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Classify image files (PNG or JPEG) with a trained model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files, any size and mode")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--name", help=f"the workspace model models/<NAME>/model.pt (default: {DEFAULT_NAME})")
    source.add_argument("--model", type=Path, metavar="PATH", help="a checkpoint file (model.pt)")
    source.add_argument("--model-uri", metavar="URI",
                        help="an MLflow model, e.g. models:/fashion-mnist-classifier@champion or runs:/<id>/model")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help=f"classes listed per image, 1..number of classes (default: {DEFAULT_TOP_K} or fewer)")
    parser.add_argument("--format", choices=("csv", "json"),
                        help="output format (default: json if --output ends in .json, else csv)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write here (atomically) instead of stdout")
    parser.add_argument("--invert", action="store_true",
                        help="invert gray levels (dark objects on a light background); transparency stays background")
    return parser.parse_args(argv)


# --- images -----------------------------------------------------------------------------------

def check_files(images: Sequence[Path]) -> None:
    """Fail on a missing path before a model is loaded (loading from MLflow takes seconds)."""
    for path in images:
        if not path.exists():
            raise DataError(f"{path}: no such file (give PNG or JPEG image files)")
        if path.is_dir():
            raise DataError(f"{path}: is a directory (give PNG or JPEG image files, e.g. {path}/*.png)")


def load_pixels(path: Path, in_shape: tuple[int, int, int], invert: bool = False,
                resize: str = DEFAULT_RESIZE, transparency: str = images.LEGACY_TRANSPARENCY) -> np.ndarray:
    """Read one PNG or JPEG file as the model's raw input: uint8 (C, H, W)."""
    try:
        return images.decode(path, in_shape, invert, resize, formats=FORMATS, transparency=transparency)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (give PNG or JPEG image files)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory (give PNG or JPEG image files)") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    except images.ImageError as exc:
        raise DataError(f"{path}: {exc}") from None


# --- models -----------------------------------------------------------------------------------

def _check_resize(resize: Any, source: str) -> str:
    if resize not in images.RESIZE_POLICIES:
        raise DataError(f"{source}: resize policy {resize!r} is not one of {', '.join(images.RESIZE_POLICIES)}")
    return str(resize)


def _check_transparency(rule: Any, source: str) -> str:
    if not is_transparency_rule(rule):
        raise DataError(f"{source}: transparency rule {rule!r} is neither auto nor a colour #rrggbb")
    return str(rule)


def _check_in_shape(shape: Any, source: str) -> tuple[int, int, int]:
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        raise DataError(f"{source}: input shape {shape!r} is not three positive integers (C, H, W)")
    if shape[0] not in (1, 3):
        raise DataError(f"{source}: the model takes {shape[0]} channels; images can only be made "
                        f"grayscale (1) or RGB (3)")
    return int(shape[0]), int(shape[1]), int(shape[2])


def workspace_checkpoint(name: str) -> Path:
    """models/<name>/model.pt of this project, or a DataError naming the models there are."""
    # A key under `models`: no path separators, so --name cannot reach outside models/.
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use a key under `models` in params.yaml "
                          f"({MODEL_NAME_RULE}), or --model PATH for a file elsewhere")
    path = ModelFiles.of(name, models_root=paths.MODELS_DIR).checkpoint
    if not path.is_file():
        trained = sorted(p.parent.name for p in paths.MODELS_DIR.glob(f"*/{CHECKPOINT}"))
        have = f"trained here: {', '.join(trained)}" if trained else "no model is trained here yet"
        raise DataError(f"{path} is missing ({have}); run `dvc repro`, or pass --model PATH or --model-uri URI")
    return path


def from_checkpoint(path: Path) -> Predictor:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"--model {path}: {what} (give a checkpoint file such as models/cnn/model.pt)")
    model, state = checkpoint.load(path)
    classifier = Classifier.from_checkpoint(model, state).eval()

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return classifier(torch.from_numpy(pixels)).numpy()

    return Predictor(str(path), _check_in_shape(state["in_shape"], str(path)), list(state["classes"]), probabilities,
                     _check_resize(state.get("resize", DEFAULT_RESIZE), str(path)),
                     _check_transparency(state.get("transparency", images.LEGACY_TRANSPARENCY), str(path)))


def _signature_shape(metadata: Any) -> list[int] | None:
    """(C, H, W) from a tensor input signature (-1, C, H, W), for models logged without metadata."""
    schema = metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    shape = list(schema.inputs[0].shape)
    return shape[1:] if len(shape) == 4 else None


def _local_model_dir(uri: str) -> Path | None:
    """The directory a path or file:// URI names, or None for a URI MLflow must resolve."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def from_mlflow(uri: str) -> Predictor:
    """A logged MLflow model. Unlike a checkpoint it can run code when loaded (torch.export.load
    unpickles its model.pt2, and its copy of src/ goes on sys.path): load models only from
    stores you trust."""
    store = tracking.tracking_uri()
    if uri.startswith(STORE_SCHEMES):
        tracking.check_store(store, "the model")
    local = _local_model_dir(uri)
    # MLflow copies whatever a local URI names before it looks inside: `--model-uri /` would copy
    # the whole disk. A model directory is recognized by its MLmodel file, and read in place.
    if local is not None and not (local / "MLmodel").is_file():
        raise DataError(f"--model-uri {uri}: {local} is not an MLflow model directory (it has no MLmodel file)")
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for our one line
    mlflow.set_tracking_uri(store)
    where = f" in the store {tracking.masked(store)}" if uri.startswith(STORE_SCHEMES) else ""
    # Downloaded files are only needed while loading: the model then lives in memory.
    with tempfile.TemporaryDirectory(prefix="imgclf-predict-") as scratch:
        try:
            # CPU: MLflow would pick CUDA when present, and the figures would then depend on the machine.
            model = mlflow.pyfunc.load_model(uri, dst_path=None if local is not None else scratch,
                                             model_config={"device": "cpu"})
        except (MlflowException, OSError, ValueError, TypeError) as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise TrackingError(
                f"--model-uri {uri}: cannot load a model{where} ({message.strip().splitlines()[0]}); expected e.g. "
                "models:/<registered name>@champion, models:/<registered name>/<version> or runs:/<run id>/model"
            ) from None
    info = model.metadata
    extra = info.metadata or {}
    shape = extra.get("input_shape") or _signature_shape(info)
    if shape is None:
        raise DataError(f"{uri}: the model states no input shape (neither metadata input_shape nor a "
                        "tensor signature (-1, C, H, W)); log it with imgclf.runlog.log_model")
    classes = extra.get("classes") or []
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{uri}: metadata classes is not a list of names")

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(pixels), dtype=np.float32)

    return Predictor(uri, _check_in_shape(shape, uri), list(classes), probabilities,
                     _check_resize(extra.get("resize", DEFAULT_RESIZE), uri),
                     _check_transparency(extra.get("transparency", images.LEGACY_TRANSPARENCY), uri))


# --- output -----------------------------------------------------------------------------------

def _check_top_k(top_k: int, num_classes: int) -> None:
    if not 1 <= top_k <= num_classes:
        raise ConfigError(f"--top-k {top_k}: must be between 1 and {num_classes} (the model's number of classes)")


def rank(files: Sequence[str], probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """One record per image: predicted class, its probability and the top-k, most probable first."""
    # Stable sort: equal probabilities keep class order, so ties come out the same every run.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    records = []
    for file, p, best in zip(files, probs, order):
        top = [{"class": classes[i], "probability": round(float(p[i]), DECIMALS)} for i in best]
        # A name that is not UTF-8 cannot go into a UTF-8 CSV or JSON as it is: its bytes are
        # written as \xNN escapes (the form error lines show it in too).
        shown_file = file if is_utf8(file) else printable(file)
        records.append({"file": shown_file, "predicted": top[0]["class"], "probability": top[0]["probability"],
                        "top_k": top})
    return records


def to_csv(records: Sequence[dict[str, Any]], top_k: int) -> str:
    """Flat columns: file, predicted, probability, top1, prob1, ..., top<k>, prob<k>."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "predicted", "probability", *[f"{c}{i}" for i in range(1, top_k + 1)
                                                         for c in ("top", "prob")]])
    for r in records:
        cells = [r["file"], r["predicted"], f"{r['probability']:.{DECIMALS}f}"]
        for entry in r["top_k"]:
            cells += [entry["class"], f"{entry['probability']:.{DECIMALS}f}"]
        writer.writerow(cells)
    return out.getvalue()


def to_json(records: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(records), indent=2) + "\n"


# --- the command --------------------------------------------------------------------------------

def load_predictor(args: argparse.Namespace) -> Predictor:
    if args.model_uri is not None:
        return from_mlflow(args.model_uri)
    if args.model is not None:
        return from_checkpoint(args.model)
    return from_checkpoint(workspace_checkpoint(args.name or DEFAULT_NAME))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    images = [Path(p) for p in args.images]
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be between 1 and the model's number of classes")
    if args.output is not None and args.output.is_dir():
        raise DataError(f"--output {args.output}: is a directory (give a file name, e.g. predictions.csv)")
    check_files(images)
    predictor = load_predictor(args)
    if predictor.classes and args.top_k is not None:
        _check_top_k(args.top_k, len(predictor.classes))
    pixels = np.stack([load_pixels(path, predictor.in_shape, args.invert, predictor.resize,
                                   predictor.transparency) for path in images])
    probs = np.concatenate([predictor.probabilities(pixels[i : i + BATCH]) for i in range(0, len(pixels), BATCH)])
    if probs.ndim != 2 or len(probs) != len(images):
        raise DataError(f"{predictor.source}: returned shape {tuple(probs.shape)} for {len(images)} images, "
                        "expected one row of class probabilities per image")
    classes = predictor.classes
    if not classes:
        log.warning("%s names no classes (no metadata 'classes'): class indices are reported", predictor.source)
        classes = [str(i) for i in range(probs.shape[1])]
    if probs.shape[1] != len(classes):
        raise DataError(f"{predictor.source}: returned {probs.shape[1]} probabilities per image "
                        f"for {len(classes)} classes")
    top_k = args.top_k if args.top_k is not None else min(DEFAULT_TOP_K, len(classes))
    _check_top_k(top_k, len(classes))
    records = rank(args.images, probs, classes, top_k)
    fmt = args.format or ("json" if args.output is not None and args.output.suffix.lower() == ".json" else "csv")
    text = to_json(records) if fmt == "json" else to_csv(records, top_k)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(args.output, text)
    log.info("%d image%s classified by %s%s", len(images), "" if len(images) == 1 else "s", predictor.source,
             f"; {fmt} written to {args.output}" if args.output is not None else "")


def entry_point() -> None:
    """The `imgclf-predict` console script."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
