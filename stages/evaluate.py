"""Stage `evaluate@<model>`: test loss, overall and per-class accuracy, confusion, mistakes."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import argparse
import logging

from imgclf import champion, cli, registry, runlog, tracking
from imgclf.config import (EvaluateConfig, MlflowConfig, PromotionConfig, load_model, load_section, model_names,
                           read_params)
from imgclf.evaluation import evaluate_checkpoint
from imgclf.paths import PROCESSED_DIR, ROOT, SRC_DIR
from imgclf.schema import ModelFiles

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
    policy = load_section("promotion", PromotionConfig, params)
    experiment_id = tracking.setup(mlflow_cfg.experiment, registered)
    files = ModelFiles.of(name)
    evaluation, meta = evaluate_checkpoint(files.checkpoint, load_model(name, params), PROCESSED_DIR, cfg, SRC_DIR)
    logged = evaluation.write(files)
    run_id = runlog.log_evaluation(experiment_id, name, files.checkpoint, evaluation.servable, meta,
                                   evaluation.metrics, logged)
    m = evaluation.metrics
    log.info("%s: test/loss %.4f  test/accuracy %.4f", name, m["test/loss"], m["test/accuracy"])
    if registered is not None:
        # After the metrics are in the run. The champion is re-scored on today's test images and the
        # policy decides (docs/champion.md); nothing of it is a DVC output (see dvc.yaml, evaluate).
        version = registry.register(run_id, name, registered, m["test/accuracy"], dataset=meta["dataset"],
                                    move_alias=False)
        if version is not None:
            champion.challenge(version, run_id, name, evaluation, meta, policy, PROCESSED_DIR, ROOT)
            # After the decision, which the card reports (docs/modelcard.md).
            champion.record_card(registered, version.version, run_id, name, evaluation.classes,
                                 evaluation.result["confusion"], meta, champion.test_digest(PROCESSED_DIR))


if __name__ == "__main__":
    cli.run(main)
