"""The train stage's work: data in, best checkpoint, history and metrics out.

`train_model` runs in one process, alone or as one process of a torchrun job. Only the process
that writes outputs validates, saves the checkpoint and metrics, and logs to MLflow (what it
logs: imgclf.runlog).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf import checkpoint, distributed, memory, runlog, runtime, tracking
from imgclf.atomic import write_json, write_text
from imgclf.config import ArchConfig, TrainConfig
from imgclf.data.dataset import Split, load_meta, load_split
from imgclf.engine import EpochRecord, Plan, fit
from imgclf.models import Classifier, build_model, count_parameters
from imgclf.schema import HISTORY_COLUMNS, ModelFiles, Timing, TrainSummary
from imgclf.transforms import Normalizer, augmentation_of

log = logging.getLogger(__name__)


def history_csv(history: list[EpochRecord]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for r in history:
        writer.writerow([r.epoch, f"{r.lr:.8g}", f"{r.train['loss']:.6f}", f"{r.train['accuracy']:.6f}",
                         f"{r.val['loss']:.6f}", f"{r.val['accuracy']:.6f}"])
    return buf.getvalue()


@dataclass(frozen=True)
class Inputs:
    """The processed data one fit reads, checked to be the same on every process."""

    meta: dict[str, Any]
    train: Split
    val: Split

    @classmethod
    def load(cls, processed_dir: Path, ctx: distributed.Context, cfg: TrainConfig, arch: ArchConfig) -> Inputs:
        meta = load_meta(processed_dir)
        train, val = load_split(processed_dir, "train", meta), load_split(processed_dir, "val", meta)
        distributed.check_same_inputs(
            ctx, params=[cfg.model_dump_json().encode(), arch.model_dump_json().encode()],
            data=[json.dumps(meta, sort_keys=True).encode(), train.images, train.labels, val.images, val.labels],
        )
        return cls(meta, train, val)

    def tensors(self, split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return runtime.place(torch.from_numpy(split.images), device), runtime.place(torch.from_numpy(split.labels), device)


def build(arch: ArchConfig, cfg: TrainConfig, meta: dict[str, Any], ctx: distributed.Context) -> nn.Module:
    """The untrained model on this process's device, seeded alike on every process."""
    model = build_model(arch, tuple(meta["shape"]), len(meta["classes"]), log_probs=cfg.loss == "nll")
    # channels_last: faster convolutions with oneDNN on CPUs and with tensor cores on GPUs.
    model = model.to(ctx.device, memory_format=torch.channels_last)
    if ctx.rank > 0:
        # Same initial weights everywhere (DDP also broadcasts rank 0's), but each process its
        # own dropout masks; rank 0 keeps the single-process stream.
        torch.manual_seed(cfg.seed + ctx.rank)
    return model


class BestCheckpoint:
    """on_improve for `fit`: the best model so far, saved at every improvement to a hidden
    sibling of the checkpoint (`.model.pt.partial`), and moved onto the checkpoint only by
    `finish`, once training is done. A run killed midway so leaves the previous finished model
    (or none: DVC removes it before the stage runs), never an unfinished one that evaluate and
    imgclf-predict would take for finished. The partial file is overwritten by the next run and
    ignored by DVC's hashes (.dvcignore)."""

    def __init__(self, path: Path, model: nn.Module, arch: ArchConfig, meta: dict[str, Any], loss: str,
                 flip_average: bool):
        self.path, self.model, self.arch, self.meta, self.loss = path, model, arch, meta, loss
        self.partial = path.with_name(f".{path.name}.partial")
        self.flip_average = flip_average
        self.record: EpochRecord | None = None

    def __call__(self, record: EpochRecord) -> None:
        self.record = record
        checkpoint.save(self.partial, self.model, cfg=self.arch, meta=self.meta, loss=self.loss,
                        extra={"epoch": record.epoch, "val_loss": record.val["loss"], "flip_average": self.flip_average})

    def finish(self) -> None:
        """The best model becomes the checkpoint (one rename: there is never a moment without
        a whole file at the checkpoint's path, old or new)."""
        os.replace(self.partial, self.path)

    def servable(self, example_images: Any, src_dir: Path) -> runlog.Servable:
        """The saved best model as MLflow logs it (reloaded: the live model is the last epoch's)."""
        model, state = checkpoint.load(self.path, self.arch)
        return runlog.Servable(Classifier.from_checkpoint(model, state), runlog.input_example(example_images),
                               src_dir, self.meta["classes"], self.meta.get("resize"),
                               self.meta.get("transparency"))


def train_model(
    name: str,
    ctx: distributed.Context,
    *,
    arch: ArchConfig,
    cfg: TrainConfig,
    eval_batch_size: int,
    experiment: str,
    registered_model: str | None = None,
    processed_dir: Path,
    files: ModelFiles,
    src_dir: Path,
) -> TrainSummary | None:
    """Train one model in this process (`ctx` from imgclf.distributed.session). Returns what
    train.json records (best epoch, its validation figures), or None on a non-writing process."""
    inputs = Inputs.load(processed_dir, ctx, cfg, arch)
    if ctx.device.type == "cpu":  # GPU memory is another budget; this one is the host's
        shape = tuple(inputs.meta["shape"])
        batch, eval_batch = cfg.batch_size // ctx.world_size, min(eval_batch_size, len(inputs.val.labels))
        need = memory.estimate_training(arch, shape, len(inputs.meta["classes"]), cfg.optimizer, cfg.momentum,
                                        batch, eval_batch)
        memory.check_fits(f"train@{name}", need, shape, f"a batch of {batch} (validation: {eval_batch})",
                          "train.batch_size or evaluate.batch_size", ctx.world_size)
    # The writer alone opens MLflow (other processes must not even create a run); it fails
    # now, not after an hour of training (also when the user could log the run but not register
    # the model: that would only show in the evaluate stage).
    experiment_id = tracking.setup(experiment, registered_model) if ctx.is_writer else ""
    threads = ctx.threads(cfg.threads)
    runtime.configure(cfg.seed, threads, cfg.deterministic)
    meta, device = inputs.meta, ctx.device
    model = build(arch, cfg, meta, ctx)
    plan = Plan(cfg, Normalizer(meta["mean"], meta["std"]).to(device), runtime.resolve_precision(cfg.precision, device),
                augment=augmentation_of(meta) if cfg.augment else None, shard=ctx.shard, validate=ctx.is_writer,
                eval_batch_size=eval_batch_size)
    net = distributed.wrap(model, ctx)
    # Each split is placed once (imgclf.runtime.place); batches are gathered from it.
    train, val = inputs.tensors(inputs.train, device), inputs.tensors(inputs.val, device)
    if not ctx.is_writer:
        fit(model, train, val, plan, train_module=net)
        return None
    facts = run_facts(model, plan, threads, ctx)
    log.info("%s: %s, %d parameters, %s, %s, %d threads per process, %d process(es) x %d images per step", name,
             arch.arch.upper(), facts["model.parameters"], facts["train.device_used"], plan.precision, threads,
             ctx.world_size, facts["train.batch_per_process"])
    best = BestCheckpoint(files.checkpoint, model, arch, meta, cfg.loss, plan.flip_average)
    params = {**runlog.flatten("train", cfg.model_dump()), **runlog.flatten("model", arch.model_dump(exclude={"train"})),
              **runlog.flatten("data", {k: meta[k] for k in ("dataset", "val_fraction", "seed", "counts")}), **facts}
    with runlog.training_run(experiment_id, name, params, meta):
        started = time.perf_counter()
        history = fit(model, train, val, plan, on_improve=best, on_epoch=runlog.log_epoch, train_module=net)
        best.finish()
        train_seconds = time.perf_counter() - started
        summary = write_outputs(files, history, best.record, facts, train_seconds, len(inputs.train.labels))
        runlog.log_trained(files.checkpoint, best.servable(inputs.val.images, src_dir), best.record, train_seconds)
    log.info("%s: best epoch %d, val/loss %.4f, val/accuracy %.4f, %.1fs", name, best.record.epoch,
             best.record.val["loss"], best.record.val["accuracy"], train_seconds)
    return summary


def run_facts(model: nn.Module, plan: Plan, threads: int, ctx: distributed.Context) -> dict[str, Any]:
    """What this run used, beyond its params: logged with them, and written to timing.json."""
    return {
        "model.parameters": count_parameters(model), "train.threads_used": threads,
        "train.precision_used": plan.precision, "train.device_used": runtime.describe_device(ctx.device),
        # batch_size is the global batch: world_size processes x batch_per_process images.
        "train.world_size": ctx.world_size, "train.batch_per_process": plan.cfg.batch_size // ctx.world_size,
        "train.effective_batch": plan.cfg.batch_size,
        # Derived from train.augment and the data set's flips (imgclf.engine.Plan.flip_average).
        "train.flip_average": plan.flip_average,
    }


def write_outputs(files: ModelFiles, history: list[EpochRecord], best: EpochRecord, facts: dict[str, Any],
                  train_seconds: float, n_train: int) -> TrainSummary:
    """history.csv and train.json (byte-reproducible) and timing.json (varies run to run);
    returns train.json's content."""
    summary: TrainSummary = {
        "best_epoch": best.epoch,
        "val/loss": round(best.val["loss"], 6),
        "val/accuracy": round(best.val["accuracy"], 6),
        "parameters": facts["model.parameters"],
        "epochs": len(history),
    }
    epoch_seconds = [r.train["seconds"] for r in history]
    timing: Timing = {
        "train_seconds": round(train_seconds, 3),
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "images_per_s": round(n_train * len(history) / sum(epoch_seconds), 1),
        "threads": facts["train.threads_used"],
        "precision": facts["train.precision_used"],
        "device": facts["train.device_used"],
        "processes": facts["train.world_size"],
        "machine": runtime.describe_machine(),
        "torch": torch.__version__,
    }
    write_text(files.history, history_csv(history))
    write_json(files.train_summary, summary)
    write_json(files.timing, timing)
    return summary
