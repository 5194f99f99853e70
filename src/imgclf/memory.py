"""Will a training run fit in the memory it has? Said in one line before it starts, instead of
the OOM killer's SIGKILL part-way through (DVC reports only "exited with -9").

The estimate counts what grows with the model and the batch sizes, never with a split's size:
the splits are memory-mapped (the page cache holds what fits and gives it back), and the
working set beyond them is bounded by the batches. Calibrated on this project's CPU runs
(peak anonymous memory sampled every 20 ms, 2 cores, torch 2.x, MLflow on SQLite):

  model (sgd unless said), images     measured   estimated (MiB)
  cnn [32,64,128,256], 1x28x28        575        600    (the default data set and model)
  mlp [64], 3x128x128                 660        720
  mlp [512,256], 3x128x128            1100       1058
  mlp [512,256], 3x128x128, adamw     1181       1155
  cnn [32,64,128,256], 3x128x128      1300       1382

(batch 128; 200 or 100 validation images a batch; 2,000 and 4,000 training images gave the
same peak.) The largest share of the big MLP's is its weights: 25 million at 128x128x3, held
four times (weights, gradients, momentum, a temporary of the optimizer's step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.config import ArchConfig
from imgclf.data.dataset import cgroup_memory
from imgclf.diskspace import human
from imgclf.errors import TrainingError
from imgclf.models import build_model

MIB = 2**20
# torch, MLflow and the stage's own objects, before any weight or batch (the smallest model's
# whole run peaked at 575 MB).
RUNTIME_BYTES = 560 * MIB


@dataclass(frozen=True)
class Estimate:
    runtime: int
    weights: int  # the weights and every copy training keeps of them
    batch: int  # the larger of a training and a validation batch's working set
    parameters: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.batch


def _activations(skeleton: nn.Module, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per image: the elements a training step keeps (every layer's output that is not a view
    or computed in place), the most an inference step holds at once (one layer's input and
    output), and the largest single output. Found by running the model on PyTorch's meta
    device: no memory, no time."""
    kept, pair, largest = 0, 0, 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal kept, pair, largest
        if not isinstance(output, torch.Tensor):
            return
        size_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        pair = max(pair, size_in + output.numel())
        if not (isinstance(module, nn.Flatten) or getattr(module, "inplace", False)):
            kept += output.numel()
            largest = max(largest, output.numel())

    leaves = [m for m in skeleton.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        # Two images: batch norm refuses to train on one when a block has shrunk the image to 1x1.
        skeleton(torch.zeros((2, *in_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return kept // 2, pair // 2, largest // 2


def estimate_training(arch: ArchConfig, in_shape: tuple[int, int, int], classes: int, optimizer: str,
                      momentum: float, batch_size: int, eval_batch: int) -> Estimate:
    """What one process training `arch` needs, in bytes (the module docstring has its
    calibration). The model is built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        skeleton = build_model(arch, in_shape, classes, log_probs=False)
    skeleton.train()
    parameters = sum(p.numel() for p in skeleton.parameters())
    states = 2 if optimizer == "adamw" else int(momentum > 0)  # Adam's two moments; SGD's momentum
    weights = parameters * 4 * (3 + states)  # weights, gradients, a step's temporary, the states
    kept, pair, _ = _activations(skeleton, in_shape)
    pixels = in_shape[0] * in_shape[1] * in_shape[2]
    train = batch_size * 4 * (pixels + kept)  # the normalized float batch plus what backward needs
    evaluate = eval_batch * 4 * (pixels + pair)
    return Estimate(RUNTIME_BYTES, weights, max(train, evaluate), parameters)


# The evaluate stage's runtime: no optimizer, no training loop (its smallest case peaked at 589 MB).
EVALUATE_RUNTIME_BYTES = 500 * MIB


def estimate_inference(arch: ArchConfig, in_shape: tuple[int, int, int], classes: int,
                       batch_size: int) -> Estimate:
    """What the evaluate stage needs, in bytes: the weights twice (the checkpoint as loaded and
    the model), and per image of a batch its pixels as floats twice (converted, then normalized)
    plus the largest layer output. Measured (peak anonymous memory, MB) against estimated (MiB):
    mlp [512,256] at 3x128x128, batches of 1000: 981 / 1069, of 200: 714 / 768; the default cnn
    at 1x28x28, batches of 1000: 589 / 605."""
    with torch.device("meta"):
        skeleton = build_model(arch, in_shape, classes, log_probs=False)
    skeleton.eval()
    parameters = sum(p.numel() for p in skeleton.parameters())
    _, _, largest = _activations(skeleton, in_shape)
    pixels = in_shape[0] * in_shape[1] * in_shape[2]
    return Estimate(EVALUATE_RUNTIME_BYTES, parameters * 4 * 2, batch_size * 4 * (2 * pixels + largest), parameters)


def _cgroup_v1_or_v2() -> tuple[int, int] | None:
    """(limit, bytes used by the group's other processes) of this process's memory cgroup."""
    limited = cgroup_memory()
    if limited is None:
        return None
    limit, anonymous = limited
    try:
        own = _own_anon()
    except OSError:
        return None
    return limit, max(0, anonymous - own)


def _own_anon() -> int:
    status = Path("/proc/self/status").read_text()
    found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else 0


def memory_budget() -> tuple[int, str] | None:
    """Bytes this process may use in all (what it holds now included), and where the figure
    comes from: its cgroup's limit less what the group's other processes hold, or the machine's
    available memory. None where /proc does not tell (not Linux)."""
    group = _cgroup_v1_or_v2()
    if group is not None:
        limit, others = group
        return limit - others, f"the cgroup memory limit {human(limit)}, less {human(others)} used by other processes"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
        return available + _own_anon(), "the machine's available memory"
    except (OSError, AttributeError):
        return None


def check_fits(stage: str, need: Estimate, in_shape: tuple[int, int, int], batches: str, lower: str,
               processes: int = 1) -> None:
    """A TrainingError, before any work, if `processes` processes needing `need` each exceed
    the memory this process has (they share its cgroup or machine). `batches` says which
    batches (e.g. "a batch of 128"), `lower` the params keys that set them."""
    budget = memory_budget()
    total = need.total * processes
    if budget is None or total <= budget[0]:
        return
    has, source = budget
    size = "x".join(map(str, in_shape))
    each = f" ({processes} processes)" if processes > 1 else ""
    raise TrainingError(
        f"{stage} needs about {human(total)} of memory{each} but has {human(has)} ({source}): "
        f"{need.parameters:,} weights take {human(need.weights)}, {batches} {size} images "
        f"{human(need.batch)}, the runtime {human(need.runtime)}; lower {lower}, the data set's image_size, or the model's size (hidden, channels), or run "
        "it with more memory")
