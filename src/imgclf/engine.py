"""The training and evaluation loops: plain metric dicts out, one `Plan` in.

A split is one uint8 tensor (memory-mapped on the CPU, see imgclf.runtime.place); each batch
is gathered by index, moved to the model's device, augmented and normalized there
(imgclf.transforms). Every random draw (the epoch's order, each image's shift and flip) comes
from one CPU generator, so the CPU and the GPU, and one process or several, see the same
batches and the same augmentation. Under data-parallel training each process takes its
`Shard` of every global batch (see imgclf.distributed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from imgclf.config import Augment, TrainConfig
from imgclf.errors import TrainingError
from imgclf.models import flip_averaged_log_probs
from imgclf.runtime import autocast
from imgclf.transforms import Normalizer, apply_moves, draw_moves

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(kind: str, label_smoothing: float = 0.0) -> LossFn:
    """The training objective for a model that outputs logits (cross_entropy) or log-probs (nll).

    cross_entropy(logits) == nll(log_softmax(logits)), smoothing included: both compute
    (1 - e) * -log p[y] + e * mean_k(-log p[k]). tests/test_models_engine.py checks loss and
    gradients.
    """
    if kind == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if kind == "nll":
        if label_smoothing == 0:
            return F.nll_loss
        # NLLLoss has no smoothing option: add the uniform-target term by hand.
        return lambda logp, y: (1 - label_smoothing) * F.nll_loss(logp, y) - label_smoothing * logp.mean(dim=1).mean()
    raise ValueError(f"unknown loss {kind!r}")


@dataclass(frozen=True)
class Shard:
    """Which part of every global batch this process trains on: process `rank` of `world_size`.

    Every process draws the same global order and augmentation, and takes a contiguous slice
    of each global batch; DDP then combines the gradients. So N processes step through exactly
    the batches one process would, each batch split N ways.
    """

    rank: int = 0
    world_size: int = 1

    def part(self, n: int) -> slice:
        """This process's slice of a global batch of `n` images (sizes differ by at most one,
        e.g. in a short last batch)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


@dataclass(frozen=True)
class Plan:
    """How a model is fitted, fixed for the whole fit: the params and the choices made from
    them and from the data (precision on this device, the data set's augmentation)."""

    cfg: TrainConfig
    normalize: Normalizer
    eval_batch_size: int = field(kw_only=True)  # evaluate.batch_size: images per validation forward pass
    precision: str = "fp32"
    augment: Augment | None = None  # None: no augmentation (train.augment false)
    shard: Shard = Shard()
    validate: bool = True  # only the process that writes outputs validates

    @property
    def flip_average(self) -> bool:
        """A model trained on mirrored images is validated, tested and served on both views
        (imgclf.models.flip_averaged_log_probs); one trained without flips sees each image once."""
        return self.augment is not None and self.augment.flip


@dataclass
class Steps:
    """The moving parts of one fit, made from its Plan: what each batch updates."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    generator: torch.Generator

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, n_train: int) -> Steps:
        optimizer = make_optimizer(model, cfg)
        scheduler = make_schedule(optimizer, cfg, cfg.epochs * math.ceil(n_train / cfg.batch_size))
        generator = torch.Generator().manual_seed(cfg.seed)  # CPU, whatever the device: see module doc
        return cls(optimizer, scheduler, make_loss(cfg.loss, cfg.label_smoothing), generator)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Batch-norm and bias parameters are not weight-decayed: shrinking them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        # Linear warm-up to cfg.lr, then cosine decay towards zero over the remaining steps.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.warmup_fraction,
            anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=1e3,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _gather(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, device: torch.device):
    """One batch by index, on `device` (a no-op move when the split already lives there)."""
    where = idx.to(images.device)
    return images[where].to(device, non_blocking=True), labels[where].to(device, non_blocking=True)


def _check_finite(value: float, epoch: int, step: int, optimizer: torch.optim.Optimizer) -> None:
    if not math.isfinite(value):
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingError(
            f"loss became {value} at epoch {epoch}, batch {step + 1} (lr {lr:.4g}); "
            "lower train.lr or check the data; no model was saved from this epoch"
        )


def train_one_epoch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, plan: Plan, steps: Steps, epoch: int,
) -> dict[str, float]:
    """One pass over the training split in global batches of `plan.cfg.batch_size`; under
    data-parallel training `model` is the DDP wrapper and this process trains on its shard of
    each batch. Returned loss and accuracy are over the whole split (all processes)."""
    model.train()
    start = time.perf_counter()
    device = next(model.parameters()).device
    shard, batch_size = plan.shard, plan.cfg.batch_size
    order = torch.randperm(len(labels), generator=steps.generator)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, correct predictions
    for step, first in enumerate(range(0, len(order), batch_size)):
        idx = order[first : first + batch_size]
        # Drawn for the whole global batch, so the random stream does not depend on the shard.
        moves = draw_moves(len(idx), steps.generator, plan.augment) if plan.augment is not None else None
        part = shard.part(len(idx))
        pixels, y = _gather(images, labels, idx[part], device)
        if moves is not None:
            pixels = apply_moves(pixels, moves[part], plan.augment.shift)
        with autocast(plan.precision, device.type):
            out = model(plan.normalize(pixels))
            loss = steps.loss_fn(out.float(), y)
        if len(y):
            summed = loss.detach().double() * len(y)
        else:  # a last global batch smaller than the process count leaves some shards empty
            summed = torch.zeros((), dtype=torch.float64, device=device)
        batch = torch.stack([summed, (out.argmax(dim=1) == y).sum().double()])
        if shard.world_size > 1:
            # The whole batch's loss on every process: all stop together on a non-finite loss.
            dist.all_reduce(batch)
            _check_finite((batch[0] / len(idx)).item(), epoch, step, steps.optimizer)
            # DDP averages the processes' gradients; weighting each shard's mean loss by its share
            # of the batch makes that average the gradient of the whole batch's mean loss, also
            # when shards differ in size (an empty one contributes zero, but still takes part).
            loss = loss * (len(y) * shard.world_size / len(idx)) if len(y) else out.sum() * 0.0
        else:
            _check_finite(loss.item(), epoch, step, steps.optimizer)
        steps.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        steps.optimizer.step()
        steps.scheduler.step()
        totals += batch
    seconds = time.perf_counter() - start
    n = len(labels)
    total_loss, correct = totals.tolist()
    return {"loss": total_loss / n, "accuracy": correct / n, "seconds": seconds, "images_per_s": n / seconds}


@torch.inference_mode()
def predict(
    model: nn.Module, images: torch.Tensor, *, normalize: Normalizer, batch_size: int, precision: str,
    flip_average: bool = False,
) -> torch.Tensor:
    """Model outputs (logits or log-probs, float32) for every image, in order; with
    `flip_average`, the log-probabilities averaged over each image and its mirror image."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for first in range(0, len(images), batch_size):
        x = normalize(images[first : first + batch_size].to(device))
        with autocast(precision, device.type):
            outs.append(flip_averaged_log_probs(model, x) if flip_average else model(x).float())
    return torch.cat(outs) if outs else torch.empty(0, device=device)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
    loss_fn: LossFn, normalize: Normalizer, batch_size: int, precision: str, flip_average: bool = False,
) -> dict[str, float]:
    """Mean loss (unsmoothed) and accuracy over a whole split. Either loss of log-probabilities
    is their negative log-likelihood (log_softmax leaves log-probabilities as they are)."""
    out = predict(model, images, normalize=normalize, batch_size=batch_size, precision=precision,
                  flip_average=flip_average)
    labels = labels.to(out.device)
    return {"loss": float(loss_fn(out, labels)), "accuracy": float((out.argmax(1) == labels).double().mean())}


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train: dict[str, float]
    val: dict[str, float]
    improved: bool


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    plan: Plan,
    *,
    on_improve: Callable[[EpochRecord], None] = lambda record: None,
    on_epoch: Callable[[EpochRecord], None] = lambda record: None,
    train_module: nn.Module | None = None,
) -> list[EpochRecord]:
    """Train for cfg.epochs; after each epoch validate, and call on_improve when val loss drops.

    `train` and `val` are (images, labels). Under data-parallel training, `train_module` is the
    DDP wrapper of `model` (the steps go through it, so gradients are combined); only the
    process that writes outputs validates (`plan.validate`; elsewhere records carry no val
    metrics and no callbacks run).
    """
    cfg = plan.cfg
    steps = Steps.start(model, cfg, len(train[1]))
    val_loss_fn = make_loss(cfg.loss)
    best = math.inf
    history: list[EpochRecord] = []
    for epoch in range(1, cfg.epochs + 1):
        lr = steps.optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(train_module or model, *train, plan, steps, epoch)
        if not plan.validate:
            history.append(EpochRecord(epoch, lr, train_metrics, {}, False))
            continue
        # The plain module, not the DDP wrapper: validation runs in this process alone.
        val_metrics = evaluate(model, *val, loss_fn=val_loss_fn, normalize=plan.normalize,
                               batch_size=plan.eval_batch_size, precision=plan.precision,
                               flip_average=plan.flip_average)
        record = EpochRecord(epoch, lr, train_metrics, val_metrics, improved=val_metrics["loss"] < best)
        if record.improved:
            best = val_metrics["loss"]
            on_improve(record)
        history.append(record)
        log.info(
            "epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  lr %.4g  %.0f img/s%s",
            epoch, cfg.epochs, train_metrics["loss"], train_metrics["accuracy"], val_metrics["loss"],
            val_metrics["accuracy"], lr, train_metrics["images_per_s"], "  (saved)" if record.improved else "",
        )
        on_epoch(record)
    return history
