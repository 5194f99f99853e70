"""The train stage's work: data in, best checkpoint, history and metrics out, all logged."""

from __future__ import annotations

import csv
import io
import logging
import platform
import time
from pathlib import Path

import torch

from imgclf import checkpoint, tracking
from imgclf.atomic import write_json, write_text
from imgclf.config import CNNConfig, MLPConfig, TrainConfig
from imgclf.data.dataset import load_meta, load_split
from imgclf.engine import Augmentation, EpochRecord, Normalizer, fit, pick_threads, resolve_precision
from imgclf.models import Classifier, build_model, count_parameters
from imgclf.schema import HISTORY_COLUMNS

log = logging.getLogger(__name__)

def set_determinism(seed: int, threads: int) -> None:
    """Same seed, params, code, data and thread count -> the same bytes out."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


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
    *,
    arch: MLPConfig | CNNConfig,
    cfg: TrainConfig,
    experiment: str,
    processed_dir: Path,
    checkpoint_path: Path,
    metrics_out: Path,
    src_dir: Path,
) -> None:
    precision = resolve_precision(cfg.precision)
    threads = pick_threads(cfg.threads)
    meta = load_meta(processed_dir)
    train = load_split(processed_dir, "train", meta)
    val = load_split(processed_dir, "val", meta)
    experiment_id = tracking.setup(experiment)  # fails now, not after an hour of training

    set_determinism(cfg.seed, threads)
    model = build_model(arch, tuple(meta["shape"]), len(meta["classes"]), log_probs=cfg.loss == "nll")
    model = model.to(memory_format=torch.channels_last)
    n_params = count_parameters(model)
    log.info("%s: %s, %d parameters, %d threads, %s", name, arch.arch.upper(), n_params, threads, precision)
    normalize = Normalizer.from_stats(meta["mean"], meta["std"])
    train_x, train_y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    val_x, val_y = torch.from_numpy(val.images), torch.from_numpy(val.labels)

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
        })
        started = time.perf_counter()
        history = fit(model, train_x, train_y, val_x, val_y, cfg=cfg, normalize=normalize,
                      precision=precision, augmentation=Augmentation.from_meta(meta),
                      on_improve=save_best, on_epoch=log_epoch)
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
            tracking.log_model(classifier, tracking.input_example(val.images), src_dir, meta["classes"])
        except Exception as exc:  # noqa: BLE001 - any tracking failure (HTTP, SQL, disk) is handled alike
            # The model and metrics are already written: losing minutes of training to a
            # tracking hiccup helps nobody. The evaluate stage re-attaches the model to a run.
            log.error("%s: the model is saved at %s, but logging it to MLflow failed (%s); "
                      "`dvc repro` continues and the evaluate stage logs it again", name, checkpoint_path, exc)
    log.info("%s: best epoch %d, val/loss %.4f, val/accuracy %.4f, %.1fs", name, record.epoch,
             record.val["loss"], record.val["accuracy"], train_seconds)
