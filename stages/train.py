"""Stage `train@<model>`: fit one model; keep the checkpoint with the lowest validation loss."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import argparse
from pathlib import Path

from imgclf import cli, distributed
from imgclf.config import EvaluateConfig, MlflowConfig, load_model, load_section, load_train, read_params
from imgclf.paths import PROCESSED_DIR, SRC_DIR
from imgclf.schema import ModelFiles
from imgclf.training import train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key under `models` in params.yaml")
    name = parser.parse_args().model
    params = read_params()
    cfg = load_train(name, params)  # validates models.<name> too
    mlflow_cfg = load_section("mlflow", MlflowConfig, params)
    # Validation after each epoch predicts in the evaluate stage's batches.
    eval_batch_size = load_section("evaluate", EvaluateConfig, params).batch_size
    if distributed.needs_launch(cfg.processes):
        # train.processes > 1 (or torchrun's multi-node settings in the environment): rerun
        # this script under torchrun, one process per shard. Bad params or a missing GPU fail
        # here, once, rather than in every process.
        distributed.launch(Path(__file__).resolve(), [name], cfg)
        return
    with distributed.session(cfg) as ctx:  # this process's share of the job: device, rank
        train_model(name, ctx, arch=load_model(name, params), cfg=cfg, eval_batch_size=eval_batch_size,
                    experiment=mlflow_cfg.experiment,
                    registered_model=mlflow_cfg.registered_as(name), processed_dir=PROCESSED_DIR,
                    files=ModelFiles.of(name), src_dir=SRC_DIR)


if __name__ == "__main__":
    cli.run(main)
