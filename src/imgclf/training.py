"""The train stage's work: data in, best checkpoint, history and metrics out, all logged."""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import time
from pathlib import Path

import torch

from imgclf import checkpoint, distributed, tracking
from imgclf.atomic import write_json, write_text
from imgclf.config import CNNConfig, MLPConfig, TrainConfig
from imgclf.data.dataset import load_meta, load_split
from imgclf.engine import (Augmentation, EpochRecord, Normalizer, describe_device, deterministic_cuda_env, fit,
                           resolve_precision)
from imgclf.models import Classifier, build_model, count_parameters
from imgclf.schema import HISTORY_COLUMNS

log = logging.getLogger(__name__)


def set_determinism(seed: int, threads: int, deterministic: bool = True) -> None:
    """With `deterministic`: same seed, params, code, data, thread count and device -> the same
    bytes out. Without it, cuDNN may pick its fastest kernels by timing them (cudnn.benchmark),
    which varies run to run; the CPU path computes the same either way."""
    if deterministic:
        deterministic_cuda_env()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def history_csv(history: list[EpochRecord]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for r in history:
        writer.writerow([r.epoch, f"{r.lr:.8g}", f"{r.train['loss']:.6f}", f"{r.train['accuracy']:.6f}",
                         f"{r.val['loss']:.6f}", f"{r.val['accuracy']:.6f}"])
    return buf.getvalue()


def train_model(
    name: str,
    ctx: distributed.Context,
    *,
    arch: MLPConfig | CNNConfig,
    cfg: TrainConfig,
    experiment: str,
    registered_model: str | None = None,
    processed_dir: Path,
    checkpoint_path: Path,
    metrics_out: Path,
    src_dir: Path,
) -> None:
    """Train one model in this process, alone or as one process of a torchrun job
    (`ctx` from imgclf.distributed.session). Only the writing process validates, saves the
    checkpoint and metrics, and logs to MLflow."""
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    threads = ctx.threads(cfg.threads)
    meta = load_meta(processed_dir)
    train = load_split(processed_dir, "train", meta)
    val = load_split(processed_dir, "val", meta)
    distributed.check_same_inputs(
        ctx, params=[cfg.model_dump_json().encode(), arch.model_dump_json().encode()],
        data=[json.dumps(meta, sort_keys=True).encode(), train.images, train.labels, val.images, val.labels],
    )
    # The writer alone opens MLflow (other processes must not even create a run); it fails
    # now, not after an hour of training (also when the user could log the run but not register
    # the model: that would only show in the evaluate stage).
    experiment_id = tracking.setup(experiment, registered_model) if ctx.is_writer else ""

    set_determinism(cfg.seed, threads, cfg.deterministic)
    model = build_model(arch, tuple(meta["shape"]), len(meta["classes"]), log_probs=cfg.loss == "nll")
    # channels_last: faster convolutions with oneDNN on CPUs and with tensor cores on GPUs.
    model = model.to(device, memory_format=torch.channels_last)
    if ctx.rank > 0:
        # Same initial weights everywhere (DDP also broadcasts rank 0's), but each process its
        # own dropout masks; rank 0 keeps the single-process stream.
        torch.manual_seed(cfg.seed + ctx.rank)
    net = distributed.wrap(model, ctx)
    n_params = count_parameters(model)
    normalize = Normalizer.from_stats(meta["mean"], meta["std"]).to(device)
    # Each split is moved to the device once; batches are gathered there (imgclf.engine).
    train_x, train_y = torch.from_numpy(train.images).to(device), torch.from_numpy(train.labels).to(device)
    val_x, val_y = torch.from_numpy(val.images).to(device), torch.from_numpy(val.labels).to(device)
    augmentation = Augmentation.from_meta(meta)
    if not ctx.is_writer:
        fit(model, train_x, train_y, val_x, val_y, cfg=cfg, normalize=normalize, precision=precision,
            augmentation=augmentation, on_improve=lambda record: None, shard=ctx.shard, train_module=net,
            validate=False)
        return
    per_process = cfg.batch_size // ctx.world_size
    log.info("%s: %s, %d parameters, %s, %s, %d threads per process, %d process(es) x %d images per step",
             name, arch.arch.upper(), n_params, describe_device(device), precision, threads, ctx.world_size,
             per_process)

    import mlflow

    best: dict[str, EpochRecord] = {}

    def save_best(record: EpochRecord) -> None:
        # Saved at every improvement, so an interrupted run still leaves its best model so far.
        best["record"] = record
        checkpoint.save(checkpoint_path, model, cfg=arch, meta=meta, loss=cfg.loss,
                        extra={"epoch": record.epoch, "val_loss": record.val["loss"]})

    def log_epoch(record: EpochRecord) -> None:
        mlflow.log_metrics(
            {
                "train/loss": record.train["loss"], "train/accuracy": record.train["accuracy"],
                "val/loss": record.val["loss"], "val/accuracy": record.val["accuracy"], "lr": record.lr,
                "train/epoch_seconds": record.train["seconds"], "train/images_per_s": record.train["images_per_s"],
            },
            step=record.epoch,
        )

    tags = tracking.provenance_tags(name, f"train@{name}")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags):
        mlflow.log_params({
            **tracking.flatten("train", cfg.model_dump()),
            **tracking.flatten("model", arch.model_dump(exclude={"train"})),
            **tracking.flatten("data", {k: meta[k] for k in ("dataset", "val_fraction", "seed", "counts")}),
            "model.parameters": n_params, "train.threads_used": threads, "train.precision_used": precision,
            "train.device_used": describe_device(device),
            # batch_size is the global batch: world_size processes x batch_per_process images.
            "train.world_size": ctx.world_size, "train.batch_per_process": per_process,
            "train.effective_batch": cfg.batch_size,
        })
        tracking.log_data(meta, "training")
        started = time.perf_counter()
        history = fit(model, train_x, train_y, val_x, val_y, cfg=cfg, normalize=normalize,
                      precision=precision, augmentation=augmentation,
                      on_improve=save_best, on_epoch=log_epoch, shard=ctx.shard, train_module=net)
        train_seconds = time.perf_counter() - started
        record = best["record"]
        summary = {
            "best_epoch": record.epoch,
            "val/loss": round(record.val["loss"], 6),
            "val/accuracy": round(record.val["accuracy"], 6),
            "parameters": n_params,
            "epochs": cfg.epochs,
        }
        # Timings vary run to run, so they live apart from the byte-reproducible outputs.
        epoch_seconds = [r.train["seconds"] for r in history]
        timing = {
            "train_seconds": round(train_seconds, 3),
            "epoch_seconds": [round(s, 3) for s in epoch_seconds],
            "images_per_s": round(len(train_y) * len(history) / sum(epoch_seconds), 1),
            "threads": threads,
            "precision": precision,
            "device": describe_device(device),
            "processes": ctx.world_size,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
        }
        write_text(metrics_out / "history.csv", history_csv(history))
        write_json(metrics_out / "train.json", summary)
        write_json(metrics_out / "timing.json", timing)
        model_sha = tracking.file_sha256(checkpoint_path)
        try:
            mlflow.set_tags({"model_sha256": model_sha, "best_epoch": str(record.epoch)})
            mlflow.log_metrics({"best/val_loss": record.val["loss"], "best/val_accuracy": record.val["accuracy"],
                                "train/seconds": train_seconds})
            best_model, state = checkpoint.load(checkpoint_path, arch)
            classifier = Classifier(best_model, state["mean"], state["std"])
            tracking.log_model(classifier, tracking.input_example(val.images), src_dir, meta["classes"],
                               meta.get("resize"))
        except Exception as exc:  # noqa: BLE001 - any tracking failure (HTTP, SQL, disk) is handled alike
            # The model and metrics are already written: losing minutes of training to a
            # tracking hiccup helps nobody. The evaluate stage re-attaches the model to a run.
            log.error("%s: the model is saved at %s, but logging it to MLflow failed (%s); "
                      "`dvc repro` continues and the evaluate stage logs it again", name, checkpoint_path, exc)
    log.info("%s: best epoch %d, val/loss %.4f, val/accuracy %.4f, %.1fs", name, record.epoch,
             record.val["loss"], record.val["accuracy"], train_seconds)
