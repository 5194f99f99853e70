"""Test-set metrics: loss, overall and per-class accuracy, confusion, confident mistakes."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import torch

from imgclf.schema import PREDICTION_COLUMNS


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
    return {
        "metrics": {
            "test/loss": round(loss, 6),
            "test/accuracy": round(float((pred == actual).mean()), 6),
            "test/per_class_accuracy": {c: round(float(a), 6) for c, a in zip(classes, per_class)},
            "test/images": int(len(actual)),
        },
        "confusion": cm.tolist(),
        "misclassified": [
            {"index": int(i), "actual": classes[actual[i]], "predicted": classes[pred[i]],
             "confidence": round(float(confidence[i]), 6)}
            for i in order
        ],
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
