"""Stage `evaluate@<model>`: test loss, overall and per-class accuracy, confusion, mistakes."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import argparse
import logging

import torch

from imgclf import checkpoint, cli, registry, tracking
from imgclf.atomic import write_json, write_text
from imgclf.config import EvaluateConfig, MlflowConfig, load_model, load_section, model_names, read_params
from imgclf.data.dataset import load_meta, load_split
from imgclf.engine import Normalizer, make_loss, predict
from imgclf.evaluation import predictions_csv, summarize
from imgclf.models import Classifier
from imgclf.paths import PROCESSED_DIR, ROOT, metrics_dir, model_dir

log = logging.getLogger("evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key under `models` in params.yaml")
    name = parser.parse_args().model
    params = read_params()
    cfg = load_section("evaluate", EvaluateConfig, params)
    mlflow_cfg = load_section("mlflow", MlflowConfig, params)
    registry.check_target(mlflow_cfg.register_model, model_names(params))
    registered = mlflow_cfg.registered_as(name)
    experiment_id = tracking.setup(mlflow_cfg.experiment, registered)
    ckpt = model_dir(name) / "model.pt"
    model, state = checkpoint.load(ckpt, load_model(name, params))
    meta = load_meta(PROCESSED_DIR)
    test = load_split(PROCESSED_DIR, "test", meta)
    x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    normalize = Normalizer.from_stats(state["mean"], state["std"])
    # fp32 for the reported figures, whatever precision training used.
    outputs = predict(model, x, normalize=normalize, batch_size=cfg.batch_size, precision="fp32")
    loss = float(make_loss(state["loss"])(outputs, y))
    result = summarize(outputs, y, loss, state["classes"], cfg.top_misclassified)
    out = metrics_dir(name)
    write_json(out / "test.json", result["metrics"])
    write_json(out / "misclassified.json", result["misclassified"])
    write_json(out / "confusion.json", {"classes": state["classes"], "counts": result["confusion"]})
    write_text(out / "predictions.csv",
               predictions_csv(test.labels, result["predicted"], result["confidence"], state["classes"]))

    import mlflow

    with tracking.resume_run(experiment_id, tracking.file_sha256(ckpt), name, f"evaluate@{name}") as run_id:
        tracking.ensure_model_logged(experiment_id, run_id, Classifier(model, state["mean"], state["std"]),
                                     tracking.input_example(test.images), ROOT / "src" / "imgclf",
                                     state["classes"], state.get("resize"))
        # A no-op for the run that trained this model (MLflow keeps one input per data set and
        # digest); it records the data when this run is new (the model came from DVC's cache).
        tracking.log_data(meta, "evaluation")
        m = result["metrics"]
        mlflow.log_metrics({"test/loss": m["test/loss"], "test/accuracy": m["test/accuracy"],
                            **{f"test/accuracy/{c}": a for c, a in m["test/per_class_accuracy"].items()}})
        for f in ("test.json", "misclassified.json", "confusion.json"):
            mlflow.log_artifact(str(out / f), artifact_path="evaluation")
    log.info("%s: test/loss %.4f  test/accuracy %.4f", name, m["test/loss"], m["test/accuracy"])
    if registered is not None:
        # After the metrics are in the run: the champion rule reads the test accuracy.
        registry.register(run_id, name, registered, m["test/accuracy"], dataset=meta["dataset"])


if __name__ == "__main__":
    cli.run(main)
