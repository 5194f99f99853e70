"""Training and evaluation loops over in-memory uint8 tensors.

The whole split stays one uint8 tensor; each batch is indexed, augmented, normalized and
converted to float in a few vectorized ops. That avoids the per-image Python work of a
classic Dataset + ToTensor + Normalize pipeline, which dominates CPU training time on
28x28 images. `train_one_epoch` and `evaluate` return plain metric dicts.

On a GPU the splits are moved to the device once and batches are gathered there. Every random
draw (the epoch's order, each image's shift and flip) still comes from one CPU generator, so
the CPU and the GPU, and one process or several, see the same batches and the same
augmentation. Under data-parallel training each process takes its `Shard` of every global
batch (see imgclf.distributed).
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
import torch.distributed as dist
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


def deterministic_cuda_env() -> None:
    # cuBLAS reads this when it creates its first handle: without it some CUDA matmuls give
    # run-to-run different sums, and use_deterministic_algorithms raises on them. So it is set
    # before any CUDA work; a value the user set (e.g. :16:8, less memory) is kept.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(requested: str, index: int = 0) -> torch.device:
    """`train.device` as a torch device: 'auto' is CUDA (GPU `index`) when PyTorch sees one, else
    the CPU; 'cuda' without a GPU is a ConfigError rather than a silent fall-back."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", index)
    if requested == "cuda":
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "PyTorch sees no CUDA GPU on this machine")
        raise ConfigError(f"train.device: got 'cuda': {why}; use 'auto' (CUDA when present, else CPU) or 'cpu'")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """'cpu' or e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)', for timing.json and MLflow."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'fp32' or 'bf16'; 'auto' picks bf16 where the device computes it natively (CPUs with
    AVX512-BF16/AMX, GPUs from Ampere on)."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        what = "GPU" if torch.device(device).type == "cuda" else "CPU"
        raise ConfigError(f"train.precision: got 'bf16': this {what} has no native bf16 support; use 'fp32' or 'auto'")
    return precision


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

    def to(self, device: torch.device | str) -> Normalizer:
        return Normalizer(self.mean.to(device), self.std.to(device))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float().div_(255.0) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Moves:
    """Per-image augmentation parameters: offsets into the padded image, and whether to flip."""

    dy: torch.Tensor
    dx: torch.Tensor
    flips: torch.Tensor

    def __getitem__(self, part: slice) -> Moves:
        return Moves(self.dy[part], self.dx[part], self.flips[part])


def draw_moves(n: int, generator: torch.Generator, shift: int = 2, flip: bool = True) -> Moves:
    """Random moves for `n` images, drawn on the CPU generator whatever device trains."""
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    # Drawn even when unused, so the random stream (and the shifts) do not depend on `flip`.
    flips = (torch.rand(n, generator=generator) < 0.5) & flip
    return Moves(dy, dx, flips)


def apply_moves(pixels: torch.Tensor, moves: Moves, shift: int = 2) -> torch.Tensor:
    """Translate each image (a padded crop at its offsets) and flip those marked, on the
    images' own device."""
    device = pixels.device
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (shift, shift, shift, shift))
    dy, dx, flips = moves.dy.to(device), moves.dx.to(device), moves.flips.to(device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    cols = torch.where(flips[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    chans = torch.arange(pixels.shape[1], device=device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def augment(pixels: torch.Tensor, generator: torch.Generator, shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Per-image random translation by up to `shift` pixels (a padded random crop) and, when
    `flip`, a random horizontal flip.

    Each image gets its own offsets and flip (unlike batch-level transforms, which draw one
    set of parameters per call). Labels are unchanged: both moves keep the class (which is
    why digits are never flipped: the data set decides, see `DatasetSpec`).
    """
    return apply_moves(pixels, draw_moves(len(pixels), generator, shift, flip), shift)


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
    shard: Shard = Shard(),
) -> dict[str, float]:
    """One pass over the training split in global batches of `batch_size`; under data-parallel
    training `model` is the DDP wrapper and this process trains on its `shard` of each batch.
    Returned loss and accuracy are over the whole split (all processes)."""
    model.train()
    start = time.perf_counter()
    device = images.device
    policy = augmentation or Augmentation()
    order = torch.randperm(len(labels), generator=generator)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, correct predictions
    for step, first in enumerate(range(0, len(order), batch_size)):
        idx = order[first : first + batch_size]
        # Drawn for the whole global batch, so the random stream does not depend on the shard.
        moves = draw_moves(len(idx), generator, policy.shift, policy.flip) if do_augment else None
        part = shard.part(len(idx))
        local = idx[part].to(device)
        pixels = images[local]
        if moves is not None:
            pixels = apply_moves(pixels, moves[part], policy.shift)
        x, y = normalize(pixels), labels[local]
        with autocast(precision, device.type):
            out = model(x)
            loss = loss_fn(out.float(), y)
        if len(y):
            summed = loss.detach().double() * len(y)
        else:  # a last global batch smaller than the process count leaves some shards empty
            summed = torch.zeros((), dtype=torch.float64, device=device)
        batch = torch.stack([summed, (out.argmax(dim=1) == y).sum().double()])
        if shard.world_size > 1:
            # The whole batch's loss on every process: all stop together on a non-finite loss.
            dist.all_reduce(batch)
            value = (batch[0] / len(idx)).item()
        else:
            value = loss.item()
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss became {value} at epoch {epoch}, batch {step + 1} (lr {lr:.4g}); "
                "lower train.lr or check the data; no model was saved from this epoch"
            )
        if shard.world_size > 1:
            # DDP averages the processes' gradients; weighting each shard's mean loss by its share
            # of the batch makes that average the gradient of the whole batch's mean loss, also
            # when shards differ in size (an empty one contributes zero, but still takes part).
            loss = loss * (len(y) * shard.world_size / len(idx)) if len(y) else out.sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        totals += batch
    seconds = time.perf_counter() - start
    n = len(labels)
    total_loss, correct = totals.tolist()
    return {"loss": total_loss / n, "accuracy": correct / n, "seconds": seconds, "images_per_s": n / seconds}


@torch.inference_mode()
def predict(
    model: nn.Module, images: torch.Tensor, *, normalize: Normalizer, batch_size: int, precision: str
) -> torch.Tensor:
    """Model outputs (logits or log-probs, float32) for every image, in order."""
    model.eval()
    outs = []
    for first in range(0, len(images), batch_size):
        with autocast(precision, images.device.type):
            outs.append(model(normalize(images[first : first + batch_size])).float())
    return torch.cat(outs) if outs else torch.empty(0, device=images.device)


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
    shard: Shard = Shard(),
    train_module: nn.Module | None = None,
    validate: bool = True,
) -> list[EpochRecord]:
    """Train for cfg.epochs; after each epoch validate, and call on_improve when val loss drops.

    Data and `model` live on one device. Under data-parallel training, `train_module` is the
    DDP wrapper of `model` (the steps go through it, so gradients are combined) and `shard`
    says which part of each batch this process takes; only the process that writes outputs
    validates (`validate=False` elsewhere: its records carry no val metrics and no callbacks
    run).
    """
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU, whatever the device: see module doc
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
            train_module or model, train_images, train_labels, optimizer=optimizer, scheduler=scheduler,
            loss_fn=train_loss, normalize=normalize, batch_size=cfg.batch_size,
            generator=generator, do_augment=cfg.augment, precision=precision, epoch=epoch,
            augmentation=augmentation, shard=shard,
        )
        if not validate:
            history.append(EpochRecord(epoch, lr, train_metrics, {}, False))
            continue
        # The plain module, not the DDP wrapper: validation runs in this process alone.
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
