"""Every file a model's stages write: its name, its folder, how dvc.yaml declares it, and its layout.

The train and evaluate stages write these files, the report (and MLflow, dvc plots and the
tests) read them; both sides take names and layouts from here. dvc.yaml cannot import Python,
so tests/test_dvc_yaml.py holds its per-model outs, metrics and plots to OUTPUTS.
Nothing heavy is imported: the report and the tests read this without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, get_origin, get_type_hints

from imgclf.paths import METRICS_DIR, MODELS_DIR

# models/<name>/
CHECKPOINT = "model.pt"  # the best-validation-loss weights and what rebuilds them (imgclf.checkpoint)
# metrics/<name>/, written by train@<name>
HISTORY = "history.csv"  # one row per epoch: HISTORY_COLUMNS
TRAIN_SUMMARY = "train.json"  # TrainSummary
TIMING = "timing.json"  # Timing: measures the machine, so it differs run to run
# metrics/<name>/, written by evaluate@<name>
TEST_METRICS = "test.json"  # EvaluationMetrics
PREDICTIONS = "predictions.csv"  # one row per test image: PREDICTION_COLUMNS
MISCLASSIFIED = "misclassified.json"  # a list of Mistake, most confident first
CONFUSION = "confusion.json"  # Confusion

HISTORY_COLUMNS = ("epoch", "lr", "train/loss", "train/accuracy", "val/loss", "val/accuracy")
PREDICTION_COLUMNS = ("index", "actual", "predicted", "confidence")

# JSON layouts. A float key also takes a JSON integer. Keys that hold '/' need TypedDict's
# functional form.
TrainSummary = TypedDict("TrainSummary", {
    "best_epoch": int, "val/loss": float, "val/accuracy": float, "parameters": int, "epochs": int})
EvaluationMetrics = TypedDict("EvaluationMetrics", {
    "test/loss": float, "test/accuracy": float, "test/per_class_accuracy": dict[str, float], "test/images": int})


class Timing(TypedDict):
    train_seconds: float
    epoch_seconds: list[float]
    images_per_s: float
    threads: int
    precision: str
    device: str
    processes: int
    machine: str
    torch: str


class Confusion(TypedDict):
    classes: list[str]
    counts: list[list[int]]  # counts[i][j]: test images of class i predicted as class j


class Mistake(TypedDict):
    index: int  # in the test split
    actual: str
    predicted: str
    confidence: float


# The JSON files whose top level is an object, by file name.
JSON_LAYOUTS: dict[str, type] = {TRAIN_SUMMARY: TrainSummary, TIMING: Timing, TEST_METRICS: EvaluationMetrics,
                                 CONFUSION: Confusion}


def layout_problem(layout: type, data: Any) -> str | None:
    """Why `data` (parsed JSON) does not have `layout`'s keys and top-level types, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    for key, hint in get_type_hints(layout).items():
        if key not in data:
            return f"missing key {key!r}"
        kind = get_origin(hint) or hint
        allowed = (int, float) if kind is float else (kind,)
        if not isinstance(data[key], allowed) or isinstance(data[key], bool):
            return f"{key!r} has the wrong type ({type(data[key]).__name__})"
    return None


Declared = Literal["outs", "metrics", "plots"]


@dataclass(frozen=True)
class Output:
    """One file of one model, as dvc.yaml's foreach stages declare it."""

    stage: Literal["train", "evaluate"]
    file: str
    # outs: cached by DVC (a stage enters the run cache only when all its plain outputs are
    # cached); metrics and plots: small, git-tracked (cache: false), so `dvc metrics diff` and
    # `dvc plots diff` compare commits without a pull.
    declared: Declared
    under_models: bool = False  # models/<name>/ rather than metrics/<name>/

    def dvc_path(self) -> str:
        """The path as dvc.yaml spells it, `${key}` standing for the model's name."""
        root = MODELS_DIR if self.under_models else METRICS_DIR
        return f"{root.name}/${{key}}/{self.file}"


OUTPUTS = (
    Output("train", CHECKPOINT, "outs", under_models=True),
    Output("train", TIMING, "outs"),
    Output("train", TRAIN_SUMMARY, "metrics"),
    Output("train", HISTORY, "plots"),
    Output("evaluate", PREDICTIONS, "outs"),
    Output("evaluate", MISCLASSIFIED, "outs"),
    Output("evaluate", CONFUSION, "outs"),
    Output("evaluate", TEST_METRICS, "metrics"),
)


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model: models/<name>/ and metrics/<name>/ (or other roots, in tests)."""

    model_dir: Path
    metrics_dir: Path

    @classmethod
    def of(cls, name: str, models_root: Path = MODELS_DIR, metrics_root: Path = METRICS_DIR) -> ModelFiles:
        return cls(models_root / name, metrics_root / name)

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT

    @property
    def history(self) -> Path:
        return self.metrics_dir / HISTORY

    @property
    def train_summary(self) -> Path:
        return self.metrics_dir / TRAIN_SUMMARY

    @property
    def timing(self) -> Path:
        return self.metrics_dir / TIMING

    @property
    def test_metrics(self) -> Path:
        return self.metrics_dir / TEST_METRICS

    @property
    def predictions(self) -> Path:
        return self.metrics_dir / PREDICTIONS

    @property
    def misclassified(self) -> Path:
        return self.metrics_dir / MISCLASSIFIED

    @property
    def confusion(self) -> Path:
        return self.metrics_dir / CONFUSION


def dvc_plots(models: list[str]) -> list[dict[str, Any]]:
    """dvc.yaml's top-level `plots` for these model names: training curves and a confusion matrix each.

    DVC's stage-level plot options take one y column per file, and the curves draw two (train and
    val), so these are top-level plots naming each model's files; tests/test_dvc_yaml.py fails when
    dvc.yaml's differ from this for the keys under `models`.
    """
    def each(file: str, y: str | tuple[str, ...]) -> dict[str, Any]:
        # A list per file, not one shared: YAML would otherwise write it as an anchor and aliases.
        return {f"{METRICS_DIR.name}/{name}/{file}": y if isinstance(y, str) else list(y) for name in models}

    return [
        {"loss": {"template": "linear", "x": "epoch", "y": each(HISTORY, ("train/loss", "val/loss"))}},
        {"accuracy": {"template": "linear", "x": "epoch", "y": each(HISTORY, ("train/accuracy", "val/accuracy"))}},
        {"confusion": {"template": "confusion", "x": "actual", "y": each(PREDICTIONS, "predicted")}},
    ]
