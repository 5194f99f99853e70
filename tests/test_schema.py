"""The files a model's stages write have the names and layouts imgclf.schema gives them, which
the report then checks them against: writer and reader share one description."""

import csv
import json
from typing import get_type_hints

import pytest
import torch

from imgclf.engine import EpochRecord
from imgclf.evaluation import Evaluation, summarize
from imgclf.schema import (
    HISTORY_COLUMNS,
    OUTPUTS,
    PREDICTION_COLUMNS,
    Confusion,
    EvaluationMetrics,
    Mistake,
    ModelFiles,
    Timing,
    TrainSummary,
    layout_problem,
)
from imgclf.training import write_outputs

CLASSES = ["cat", "dog", "owl"]
FACTS = {"model.parameters": 1234, "train.threads_used": 2, "train.precision_used": "fp32",
         "train.device_used": "cpu", "train.world_size": 1}


def _keys(layout: type) -> set[str]:
    return set(get_type_hints(layout))


def _header(path) -> tuple[str, ...]:
    with path.open(newline="", encoding="utf-8") as f:
        return tuple(next(csv.reader(f)))


@pytest.fixture
def files(tmp_path) -> ModelFiles:
    return ModelFiles.of("tiny", models_root=tmp_path / "models", metrics_root=tmp_path / "metrics")


def test_train_stage_writes_the_schema_layouts(files):
    history = [EpochRecord(e, 0.1, {"loss": 1.0 / e, "accuracy": 0.5, "seconds": 2.0},
                           {"loss": 0.9 / e, "accuracy": 0.6}, True) for e in (1, 2)]
    summary = write_outputs(files, history, history[-1], FACTS, 4.5, n_train=100)
    written = json.loads(files.train_summary.read_text())
    assert written == summary and set(written) == _keys(TrainSummary)
    assert layout_problem(TrainSummary, written) is None
    timing = json.loads(files.timing.read_text())
    assert set(timing) == _keys(Timing) and layout_problem(Timing, timing) is None
    assert _header(files.history) == HISTORY_COLUMNS


def test_evaluate_stage_writes_the_schema_layouts(files):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    outputs = torch.eye(3)[torch.tensor([0, 1, 1, 0, 2, 2])] * 5  # two mistakes
    result = summarize(outputs, labels, 0.3, CLASSES, top_k=5)
    logged = Evaluation(result, labels.numpy(), CLASSES, servable=None).write(files)
    assert logged == [files.test_metrics, files.misclassified, files.confusion]
    test = json.loads(files.test_metrics.read_text())
    assert set(test) == _keys(EvaluationMetrics) and layout_problem(EvaluationMetrics, test) is None
    confusion = json.loads(files.confusion.read_text())
    assert set(confusion) == _keys(Confusion) and layout_problem(Confusion, confusion) is None
    mistakes = json.loads(files.misclassified.read_text())
    assert len(mistakes) == 2 and all(set(m) == _keys(Mistake) and layout_problem(Mistake, m) is None
                                      for m in mistakes)
    assert _header(files.predictions) == PREDICTION_COLUMNS


def test_every_named_file_is_where_model_files_puts_it(files):
    paths = {files.checkpoint, files.history, files.train_summary, files.timing, files.test_metrics,
             files.predictions, files.misclassified, files.confusion}
    assert {p.name for p in paths} == {o.file for o in OUTPUTS}
    assert all(p.parent == (files.model_dir if p.name == "model.pt" else files.metrics_dir) for p in paths)
    assert {o.file for o in OUTPUTS if o.under_models} == {files.checkpoint.name}


@pytest.mark.parametrize("data, problem", [
    ([], "expected a JSON object, got list"),
    ({"index": 1, "actual": "cat", "predicted": "dog"}, "missing key 'confidence'"),
    ({"index": True, "actual": "cat", "predicted": "dog", "confidence": 0.5}, "'index' has the wrong type (bool)"),
    ({"index": 1.0, "actual": "cat", "predicted": "dog", "confidence": 0.5}, "'index' has the wrong type (float)"),
    ({"index": 1, "actual": "cat", "predicted": "dog", "confidence": "high"}, "'confidence' has the wrong type (str)"),
])
def test_layout_problem_names_what_is_wrong(data, problem):
    assert layout_problem(Mistake, data) == problem


def test_a_json_integer_is_a_valid_float():
    assert layout_problem(Mistake, {"index": 1, "actual": "cat", "predicted": "dog", "confidence": 1}) is None
