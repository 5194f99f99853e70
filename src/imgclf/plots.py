"""The report's figures, each returned as PNG bytes that are identical for identical inputs.

Figures are drawn on bare `matplotlib.figure.Figure` objects, never through pyplot: nothing
global (backend, figure registry) changes, and saving to PNG always goes through Agg. matplotlib
itself is imported only when a figure is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
# tab10, spelled out so that a user's matplotlibrc cannot change which model gets which colour.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
RIGHT, WRONG = "#1a7f37", "#cf222e"

_Plot = TypeVar("_Plot", bound=Callable[..., bytes])


def _stock_style(plot: _Plot) -> _Plot:
    """Draw under matplotlib's default style, so a local matplotlibrc cannot change the bytes."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        import matplotlib.style

        with matplotlib.style.context("default"):
            return plot(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _figure(width: float, height: float, **kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, **kwargs)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # The "Software" chunk would carry the matplotlib version; Agg writes no timestamp.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    width, height = fig.get_size_inches()
    log.debug("rendered a %.1f x %.1f in figure: %d bytes", width, height, buf.tell())
    return buf.getvalue()


def _text(label: str) -> str:
    """Literal text: a `$` in a model or class name must not switch matplotlib to mathtext."""
    return label.replace("$", r"\$")


def _image_grid(rows: int, cols: int, side: float, *, gap: float, title_h: float,
                left: float = 0.1) -> tuple[Figure, np.ndarray]:
    """rows x cols square image axes of `side` inches, each with `title_h` inches above it for a
    title and `gap` inches between columns, under a band for the figure's own title."""
    header, right, bottom = 0.4, 0.1, 0.1
    width = left + cols * side + (cols - 1) * gap + right
    height = header + rows * (title_h + side) + bottom
    fig = _figure(width, height)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - right / width, bottom=bottom / height,
        top=1 - (header + title_h) / height, wspace=gap / side, hspace=title_h / side))
    return fig, axes


def _headline(fig: Figure, text: str) -> None:
    fig.suptitle(text, y=1 - 0.2 / fig.get_figheight(), va="center")


def _show(ax: Axes, image: np.ndarray) -> None:
    """One (C, H, W) uint8 image, gray for C=1 and RGB for C=3, without ticks."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    elif image.shape[0] == 3:
        ax.imshow(np.transpose(image, (1, 2, 0)), interpolation="nearest")
    else:
        raise ValueError(f"cannot draw an image with {image.shape[0]} channels (need 1 or 3)")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Axes, colour: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5)


def _message(text: str) -> bytes:
    fig = _figure(6, 0.8)
    fig.text(0.5, 0.5, _text(text), ha="center", va="center", fontsize=11)
    return _png(fig)


@_stock_style
def sample_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], per_class: int) -> bytes:
    """The first `per_class` images of each class (in index order), one labelled row per class."""
    fig, axes = _image_grid(len(classes), per_class, 0.75, gap=0.06, title_h=0.06, left=1.4)
    _headline(fig, f"First {per_class} training images of each class")
    for row, name in enumerate(classes):
        members = np.flatnonzero(labels == row)[:per_class]
        for col, ax in enumerate(axes[row]):
            if col < len(members):
                _show(ax, images[members[col]])
            else:
                ax.axis("off")  # a class with fewer images than asked for: leave the cell empty
        axes[row, 0].text(-0.12, 0.5, _text(name), transform=axes[row, 0].transAxes,
                          ha="right", va="center", fontsize=10)
    return _png(fig)


@_stock_style
def training_curves(histories: Mapping[str, pd.DataFrame]) -> bytes:
    """Loss and accuracy per epoch: one colour per model, training dashed, validation solid."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.3, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (name, history) in enumerate(histories.items()):
        colour = COLOURS[i % len(COLOURS)]
        for split, style, label in (("train", "--", "training"), ("val", "-", "validation")):
            common = dict(color=colour, marker="o", markersize=3, label=_text(f"{name} {label}"))
            loss_ax.plot(history["epoch"], history[f"{split}/loss"], style, **common)
            acc_ax.plot(history["epoch"], 100 * history[f"{split}/accuracy"], style, **common)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


@_stock_style
def confusion_matrix(counts: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """Counts per (actual row, predicted column), shaded by the share of the actual class."""
    counts = np.asarray(counts, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion counts have shape {counts.shape}, expected ({n}, {n})")
    # Shading by row share keeps classes with fewer test images as readable as the others.
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 2.4 + 0.5 * n
    fig = _figure(side + 1.2, side, layout="constrained")
    ax = fig.subplots()
    shading = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(n, n):
        colour = "white" if share[i, j] > 0.5 else ("#9a9a9a" if counts[i, j] == 0 else "black")
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    names = [_text(c) for c in classes]
    ax.set_xticks(range(n), labels=names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=names)
    ax.set(xlabel="predicted class", ylabel="actual class", title=_text(title))
    fig.colorbar(shading, ax=ax, shrink=0.8, label="share of the actual class")
    return _png(fig)


@_stock_style
def per_class_accuracy(per_class: Mapping[str, Mapping[str, float]], classes: Sequence[str]) -> bytes:
    """Horizontal bars of test accuracy: one group per class, one bar per model."""
    models = list(per_class)
    height = 0.8 / len(models)
    fig = _figure(8.5, 1.4 + len(classes) * (0.2 + 0.2 * len(models)), layout="constrained")
    ax = fig.subplots()
    rows = np.arange(len(classes))
    for k, name in enumerate(models):
        values = [100 * per_class[name][c] for c in classes]
        ax.barh(rows - 0.4 + height * (k + 0.5), values, height=height,
                color=COLOURS[k % len(COLOURS)], label=_text(name))
    ax.set_yticks(rows, labels=[_text(c) for c in classes])
    ax.invert_yaxis()  # first class on top, as in the tables
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=min(len(models), 5), frameon=False)
    return _png(fig)


@_stock_style
def prediction_grid(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray,
                    classes: Sequence[str], n: int) -> bytes:
    """The first n images titled "predicted (actual)": green when right, red when wrong."""
    n = min(n, len(images))
    if n == 0:
        return _message("No test images.")
    cols = min(n, 10)
    fig, axes = _image_grid(math.ceil(n / cols), cols, 1.05, gap=0.18, title_h=0.42)
    _headline(fig, "Predicted class (actual class)")
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        _show(ax, images[k])
        colour = RIGHT if actual[k] == predicted[k] else WRONG
        _frame(ax, colour)  # the frame repeats the verdict for readers who cannot tell red from green
        ax.set_title(_text(f"{classes[predicted[k]]}\n({classes[actual[k]]})"), fontsize=8, color=colour)
    return _png(fig)


@_stock_style
def misclassified_grid(images: np.ndarray, items: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> bytes:
    """Wrongly classified images (as listed in misclassified.json) with prediction and confidence."""
    if not items:
        return _message("No misclassified test images.")
    unknown = sorted({str(item[k]) for item in items for k in ("actual", "predicted")} - set(classes))
    if unknown:
        raise ValueError(f"misclassified items name unknown classes: {', '.join(unknown)}")
    cols = min(len(items), 8)
    fig, axes = _image_grid(math.ceil(len(items) / cols), cols, 1.05, gap=0.3, title_h=0.58)
    _headline(fig, "Predicted class, confidence and actual class")
    for k, ax in enumerate(axes.flat):
        if k >= len(items):
            ax.axis("off")
            continue
        item = items[k]
        _show(ax, images[item["index"]])
        _frame(ax, WRONG)
        title = f"{item['predicted']}\n{100 * item['confidence']:.1f}%\n(true: {item['actual']})"
        ax.set_title(_text(title), fontsize=8, color=WRONG)
    return _png(fig)
