"""Checkpoints: a state dict plus everything needed to rebuild and use the model.

Saved as plain tensors, strings and numbers, and loaded with `weights_only=True`, so a
checkpoint can never run code when it is opened (a pickled object is refused).
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from imgclf.atomic import write_bytes
from imgclf.config import LOSSES, ArchConfig, model_from_dict
from imgclf.errors import DataError
from imgclf.models import architecture, build_model

FORMAT = 1


def save(path: Path, model: nn.Module, *, cfg: ArchConfig, meta: dict[str, Any], loss: str,
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
        # Image folders record how their images were resized; predict must do the same. Absent
        # for the built-in sets (and older checkpoints), whose images were stretched, if at all.
        **({"resize": meta["resize"]} if "resize" in meta else {}),
        # Likewise how transparency became pixels (absent: black, imgclf.data.images).
        **({"transparency": meta["transparency"]} if "transparency" in meta else {}),
        **extra,
    }
    # Serialized in memory: torch.save names the archive's folder after the file it writes,
    # and the atomic write's temporary name is random, which would change the bytes each run.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def _unusable(state: dict[str, Any]) -> str | None:
    """Why the plain fields of a checkpoint cannot rebuild a model, or None if they can.

    torch's weights_only gate guarantees plain data, not the right data: a checkpoint from
    another version, or a damaged or hand-edited one, must fail here in one line.
    """
    weights = state.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "state_dict is not a mapping of tensors"
    if state.get("loss") not in LOSSES:
        return f"loss {state.get('loss')!r} is not one of {', '.join(map(repr, LOSSES))}"
    shape = state.get("in_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        return f"in_shape {shape!r} is not three positive integers"
    classes = state.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "classes is not a non-empty list of names"
    for key in ("mean", "std"):
        stats = state.get(key)
        if not (isinstance(stats, list) and len(stats) == shape[0]
                and all(type(x) in (int, float) and math.isfinite(x) for x in stats)):
            return f"{key} is not {shape[0]} finite numbers"
    if not all(s > 0 for s in state["std"]):
        return "std has a value that is not positive"
    if not isinstance(state.get("flip_average", False), bool):  # absent in checkpoints from before it
        return "flip_average is not true or false"
    return None


def load(path: Path, expected: ArchConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
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
    problem = _unusable(state)
    if problem:
        raise DataError(f"{path}: not a usable checkpoint ({problem})")
    try:
        cfg = model_from_dict(state.get("architecture"))
    except (ValidationError, TypeError) as exc:
        raise DataError(f"{path}: not a usable checkpoint (architecture: {str(exc).splitlines()[0]})") from None
    if expected is not None and architecture(expected) != architecture(cfg):
        raise DataError(
            f"{path}: trained with architecture {architecture(cfg)}, but params.yaml now says "
            f"{architecture(expected)}: run `dvc repro` to retrain"
        )
    args = (cfg, tuple(state["in_shape"]), len(state["classes"]))
    try:
        # Shapes first, on the meta device (no memory): a crafted architecture such as
        # hidden: [10**9] must not allocate gigabytes before it is found not to fit.
        with torch.device("meta"):
            skeleton = build_model(*args, log_probs=False)
        wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
        if wanted != found:
            diff = sorted(set(wanted.items()) ^ set(found.items()))[:2]
            raise ValueError(f"expected and stored shapes differ, e.g. {diff}")
        model = build_model(*args, log_probs=state["loss"] == "nll")
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, state

