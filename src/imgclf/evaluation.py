"""The evaluate stage's work: test loss, overall and per-class accuracy, confusion, confident mistakes."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf import checkpoint, memory
from imgclf.atomic import write_json, write_text
from imgclf.config import ArchConfig, EvaluateConfig
from imgclf.data.dataset import load_meta, load_split
from imgclf.engine import make_loss, predict
from imgclf.models import Classifier
from imgclf.runlog import Servable, input_example
from imgclf.schema import PREDICTION_COLUMNS, Confusion, EvaluationMetrics, Mistake, ModelFiles


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = images of class i predicted as class j."""
    return np.bincount(actual * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def summarize(outputs: torch.Tensor, labels: torch.Tensor, loss: float, classes: list[str], top_k: int) -> dict[str, Any]:
    """Everything the evaluate stage reports, from the model's outputs on the test split."""
    probs = torch.softmax(outputs.float(), dim=1)  # log_softmax outputs give the same probs
    confidence, predicted = probs.max(dim=1)
    actual = labels.numpy()
    pred = predicted.numpy()
    cm = confusion_matrix(actual, pred, len(classes))
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    wrong = np.flatnonzero(pred != actual)
    # Most confident mistakes first; ties broken by index so the order is reproducible.
    order = wrong[np.lexsort((wrong, -confidence.numpy()[wrong]))][:top_k]
    metrics: EvaluationMetrics = {
        "test/loss": round(loss, 6),
        "test/accuracy": round(float((pred == actual).mean()), 6),
        "test/per_class_accuracy": {c: round(float(a), 6) for c, a in zip(classes, per_class)},
        "test/images": int(len(actual)),
    }
    misclassified: list[Mistake] = [
        {"index": int(i), "actual": classes[actual[i]], "predicted": classes[pred[i]],
         "confidence": round(float(confidence[i]), 6)}
        for i in order
    ]
    return {
        "metrics": metrics,
        "confusion": cm.tolist(),
        "misclassified": misclassified,
        "predicted": pred,
        "confidence": confidence.numpy(),
    }


def predictions_csv(actual: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, classes: list[str]) -> str:
    """One row per test image; `dvc plots` draws the confusion matrix from actual/predicted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for i, (a, p, c) in enumerate(zip(actual, predicted, confidence)):
        writer.writerow([i, classes[a], classes[p], f"{c:.6f}"])
    return buf.getvalue()


@dataclass(frozen=True)
class Evaluation:
    """One checkpoint on the test split: its results, and what is needed to log the model."""

    result: dict[str, Any]  # from `summarize`
    labels: np.ndarray
    classes: list[str]
    servable: Servable

    @property
    def metrics(self) -> EvaluationMetrics:
        return self.result["metrics"]

    def write(self, files: ModelFiles) -> list[Path]:
        """metrics/<model>/: test.json, misclassified.json, confusion.json (returned: MLflow logs
        them) and predictions.csv."""
        confusion: Confusion = {"classes": self.classes, "counts": self.result["confusion"]}
        write_json(files.test_metrics, self.metrics)
        write_json(files.misclassified, self.result["misclassified"])
        write_json(files.confusion, confusion)
        write_text(files.predictions,
                   predictions_csv(self.labels, self.result["predicted"], self.result["confidence"], self.classes))
        return [files.test_metrics, files.misclassified, files.confusion]


def evaluate_checkpoint(path: Path, arch: ArchConfig, processed_dir: Path, cfg: EvaluateConfig,
                        src_dir: Path) -> tuple[Evaluation, dict[str, Any]]:
    """The evaluate stage's work: the checkpoint's outputs on the test split, summarized.
    Returns the evaluation and the processed data's meta.json."""
    meta = load_meta(processed_dir)
    shape = tuple(meta["shape"])
    batch = min(cfg.batch_size, max(1, int(meta.get("counts", {}).get("test", cfg.batch_size))))
    need = memory.estimate_inference(arch, shape, len(meta["classes"]), batch)
    memory.check_fits(f"evaluate@{path.parent.name}", need, shape, f"a batch of {batch}", "evaluate.batch_size")
    model, state = checkpoint.load(path, arch)
    test = load_split(processed_dir, "test", meta)
    x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    # fp32 for the reported figures, whatever precision training used.
    classifier = Classifier.from_checkpoint(model, state)
    outputs = predict(model, x, normalize=classifier.normalize, batch_size=cfg.batch_size, precision="fp32",
                      flip_average=classifier.flip_average)
    loss = float(make_loss(state["loss"])(outputs, y))
    result = summarize(outputs, y, loss, state["classes"], cfg.top_misclassified)
    servable = Servable(classifier, input_example(test.images), src_dir,
                        state["classes"], state.get("resize"), state.get("transparency"))
    return Evaluation(result, test.labels, list(state["classes"]), servable), meta
