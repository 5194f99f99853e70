"""Training and evaluation loops over in-memory uint8 tensors.

The whole split stays one uint8 tensor; each batch is indexed, augmented, normalized and
converted to float in a few vectorized ops. That avoids the per-image Python work of a
classic Dataset + ToTensor + Normalize pipeline, which dominates CPU training time on
28x28 images. `train_one_epoch` and `evaluate` return plain metric dicts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.config import TrainConfig
from imgclf.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(kind: str, label_smoothing: float = 0.0) -> LossFn:
    """The training objective for a model that outputs logits (cross_entropy) or log-probs (nll).

    cross_entropy(logits) == nll(log_softmax(logits)), smoothing included: both compute
    (1 - e) * -log p[y] + e * mean_k(-log p[k]). tests/test_engine.py checks loss and gradients.
    """
    if kind == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if kind == "nll":
        if label_smoothing == 0:
            return F.nll_loss
        # NLLLoss has no smoothing option: add the uniform-target term by hand.
        return lambda logp, y: (1 - label_smoothing) * F.nll_loss(logp, y) - label_smoothing * logp.mean(dim=1).mean()
    raise ValueError(f"unknown loss {kind!r}")


def pick_threads(requested: int) -> int:
    """`requested`, or when 0 the CPUs this process may run on (cgroup/affinity aware)."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    """'fp32' or 'bf16'; 'auto' picks bf16 where the CPU computes it natively."""
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision == "bf16" and not bf16_supported():
        raise ConfigError("train.precision: got 'bf16': this CPU has no native bf16 support; use 'fp32' or 'auto'")
    return precision


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Augmentation:
    """What `train.augment` does for a data set (recorded in meta.json by the preprocess stage)."""

    shift: int = 2
    flip: bool = True

    @classmethod
    def from_meta(cls, meta: dict) -> Augmentation:
        policy = meta.get("augment", {})
        return cls(shift=int(policy.get("shift", 2)), flip=bool(policy.get("flip", True)))


@dataclass(frozen=True)
class Normalizer:
    """uint8 (N, C, H, W) -> standardized float32, channels_last for faster CPU convolutions."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_stats(cls, mean: list[float], std: list[float]) -> Normalizer:
        return cls(torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float().div_(255.0) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def augment(pixels: torch.Tensor, generator: torch.Generator, shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Per-image random translation by up to `shift` pixels (a padded random crop) and, when
    `flip`, a random horizontal flip.

    Each image gets its own offsets and flip (unlike batch-level transforms, which draw one
    set of parameters per call). Labels are unchanged: both moves keep the class (which is
    why digits are never flipped: the data set decides, see `DatasetSpec`).
    """
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    # Drawn even when unused, so the random stream (and the shifts) do not depend on `flip`.
    flips = (torch.rand(n, generator=generator) < 0.5) & flip
    cols = torch.where(flips[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(pixels.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


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


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: LossFn,
    normalize: Normalizer,
    batch_size: int,
    generator: torch.Generator,
    do_augment: bool,
    precision: str,
    epoch: int,
    augmentation: Augmentation | None = None,
) -> dict[str, float]:
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(labels), generator=generator)
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    for step, first in enumerate(range(0, len(order), batch_size)):
        idx = order[first : first + batch_size]
        pixels = images[idx]
        if do_augment:
            policy = augmentation or Augmentation()
            pixels = augment(pixels, generator, shift=policy.shift, flip=policy.flip)
        x, y = normalize(pixels), labels[idx]
        with autocast(precision):
            out = model(x)
            loss = loss_fn(out.float(), y)
        if not math.isfinite(loss.item()):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch}, batch {step + 1} (lr {lr:.4g}); "
                "lower train.lr or check the data; no model was saved from this epoch"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach().double() * len(y)
        correct += int((out.argmax(dim=1) == y).sum())
    seconds = time.perf_counter() - start
    n = len(labels)
    return {"loss": float(total_loss) / n, "accuracy": correct / n, "seconds": seconds, "images_per_s": n / seconds}


@torch.inference_mode()
def predict(
    model: nn.Module, images: torch.Tensor, *, normalize: Normalizer, batch_size: int, precision: str
) -> torch.Tensor:
    """Model outputs (logits or log-probs, float32) for every image, in order."""
    model.eval()
    outs = []
    for first in range(0, len(images), batch_size):
        with autocast(precision):
            outs.append(model(normalize(images[first : first + batch_size])).float())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_fn: LossFn,
    normalize: Normalizer,
    batch_size: int,
    precision: str,
) -> dict[str, float]:
    """Mean loss (unsmoothed) and accuracy over a whole split."""
    out = predict(model, images, normalize=normalize, batch_size=batch_size, precision=precision)
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
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    cfg: TrainConfig,
    normalize: Normalizer,
    precision: str,
    augmentation: Augmentation | None = None,
    on_improve: Callable[[EpochRecord], None],
    on_epoch: Callable[[EpochRecord], None] = lambda record: None,
) -> list[EpochRecord]:
    """Train for cfg.epochs; after each epoch validate, and call on_improve when val loss drops."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    scheduler = make_schedule(optimizer, cfg, cfg.epochs * steps_per_epoch)
    train_loss = make_loss(cfg.loss, cfg.label_smoothing)
    val_loss_fn = make_loss(cfg.loss)
    best = math.inf
    history: list[EpochRecord] = []
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(
            model, train_images, train_labels, optimizer=optimizer, scheduler=scheduler,
            loss_fn=train_loss, normalize=normalize, batch_size=cfg.batch_size,
            generator=generator, do_augment=cfg.augment, precision=precision, epoch=epoch,
            augmentation=augmentation,
        )
        val_metrics = evaluate(
            model, val_images, val_labels, loss_fn=val_loss_fn, normalize=normalize,
            batch_size=cfg.eval_batch_size, precision=precision,
        )
        improved = val_metrics["loss"] < best
        record = EpochRecord(epoch, lr, train_metrics, val_metrics, improved)
        if improved:
            best = val_metrics["loss"]
            on_improve(record)
        history.append(record)
        log.info(
            "epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  lr %.4g  %.0f img/s%s",
            epoch, cfg.epochs, train_metrics["loss"], train_metrics["accuracy"], val_metrics["loss"],
            val_metrics["accuracy"], lr, train_metrics["images_per_s"], "  (saved)" if improved else "",
        )
        on_epoch(record)
    return history
