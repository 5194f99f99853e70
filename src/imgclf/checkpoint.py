"""Checkpoints: a state dict plus everything needed to rebuild and use the model.

Saved as plain tensors, strings and numbers, and loaded with `weights_only=True`, so a
checkpoint can never run code when it is opened (a pickled object is refused).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.atomic import write_bytes
from imgclf.config import CNNConfig, MLPConfig, model_from_dict
from imgclf.errors import DataError
from imgclf.models import architecture, build_model

FORMAT = 1


def save(path: Path, model: nn.Module, *, cfg: MLPConfig | CNNConfig, meta: dict[str, Any], loss: str,
         extra: dict[str, Any]) -> None:
    state = {
        "format": FORMAT,
        # Cloned to contiguous CPU tensors so the bytes do not depend on memory layout.
        "state_dict": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
        "architecture": architecture(cfg),
        "loss": loss,
        "in_shape": list(meta["shape"]),
        "classes": list(meta["classes"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        **extra,
    }
    # Serialized in memory: torch.save names the archive's folder after the file it writes,
    # and the atomic write's temporary name is random, which would change the bytes each run.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load(path: Path, expected: MLPConfig | CNNConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint; refuse files that are not plain data or do not fit."""
    if not path.exists():
        raise DataError(f"{path} is missing: run `dvc repro` to train it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unsupported content"
        raise DataError(f"{path}: refused to load: not a plain-data checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a checkpoint of this pipeline (format {FORMAT} expected)")
    cfg = model_from_dict(state["architecture"])
    if expected is not None and architecture(expected) != architecture(cfg):
        raise DataError(
            f"{path}: trained with architecture {architecture(cfg)}, but params.yaml now says "
            f"{architecture(expected)}: run `dvc repro` to retrain"
        )
    model = build_model(cfg, tuple(state["in_shape"]), len(state["classes"]), log_probs=state["loss"] == "nll")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise DataError(f"{path}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, state

