"""Checks across params sections that no single section's schema can make: does every model
build for the chosen data set's images? Run by the validate stage, before DVC deletes any
output: a model that cannot be built would otherwise fail in train, after the previous model
is gone.

The model is built for real, on PyTorch's meta device (shapes only, no memory, no time), so the
rule is the model code's own (the CNN halves the image per block) and cannot drift from it.
"""

from __future__ import annotations

from typing import Any

from imgclf.config import DatasetConfig, load_dataset, load_dataset_name, load_model, model_names
from imgclf.errors import ConfigError

# The built-in formats whose image shape is fixed by the format; an IDX file states its own
# (MNIST's family is 28x28, but nothing promises it) and is checked by train once downloaded.
_FORMAT_SHAPES = {"cifar": (3, 32, 32)}


def input_shape(ds: DatasetConfig) -> tuple[int, int, int] | None:
    """(channels, height, width) the models will get, when params alone tell it."""
    if ds.format == "folder" and ds.image_size is not None and ds.channels is not None:
        return (ds.channels, *ds.image_size)
    return _FORMAT_SHAPES.get(ds.format)


def check_models_fit(params: dict[str, Any]) -> None:
    """A ConfigError naming the first model that cannot be built for the data set's images."""
    name = load_dataset_name(params)
    ds = load_dataset(name, params)
    shape = input_shape(ds)
    if shape is None:
        return
    import torch

    from imgclf.models import build_model

    classes = max(2, len(ds.classes or []))  # a folder's classes are known after preprocess
    for model in model_names(params):
        cfg = load_model(model, params)
        try:
            with torch.device("meta"):
                build_model(cfg, shape, classes, log_probs=False)
        except (ValueError, RuntimeError) as exc:
            size = "x".join(map(str, shape[1:]))
            raise ConfigError(
                f"models.{model}: cannot be built for datasets.{name}'s {size} images ({exc}); "
                "use fewer blocks in its channels or a larger image_size") from None
