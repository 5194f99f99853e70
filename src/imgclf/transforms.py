"""What happens to a batch of uint8 images before the model sees it: augmentation, normalization.

Both work on whole (N, C, H, W) batches in a few vectorized ops, on the images' own device:
per-image Python work (a classic Dataset + ToTensor + Normalize pipeline) dominates CPU
training time on 28x28 images. The same Normalizer is inside the logged model
(imgclf.models.Classifier), so served predictions see exactly what evaluation saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.config import Augment


def augmentation_of(meta: dict[str, Any]) -> Augment:
    """What `train.augment` does for this data set, as the preprocess stage recorded it."""
    return Augment.model_validate(meta["augment"])


class Normalizer(nn.Module):
    """uint8 (N, C, H, W) -> standardized float32, channels_last for faster CPU convolutions."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
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


def draw_moves(n: int, generator: torch.Generator, policy: Augment) -> Moves:
    """Random moves for `n` images, drawn on the CPU generator whatever device trains."""
    dy = torch.randint(0, 2 * policy.shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * policy.shift + 1, (n,), generator=generator)
    # Drawn even when unused, so the random stream (and the shifts) do not depend on `flip`.
    flips = (torch.rand(n, generator=generator) < 0.5) & policy.flip
    return Moves(dy, dx, flips)


def apply_moves(pixels: torch.Tensor, moves: Moves, shift: int) -> torch.Tensor:
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


def augment(pixels: torch.Tensor, generator: torch.Generator, policy: Augment) -> torch.Tensor:
    """Per-image random translation by up to `policy.shift` pixels (a padded random crop) and,
    when `policy.flip`, a random horizontal flip.

    Each image gets its own offsets and flip (unlike batch-level transforms, which draw one
    set of parameters per call). Labels are unchanged: both moves keep the class (which is
    why digits are never flipped: the data set's entry in params.yaml decides).
    """
    return apply_moves(pixels, draw_moves(len(pixels), generator, policy), policy.shift)
