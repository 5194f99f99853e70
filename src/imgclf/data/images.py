"""One image file -> the model's raw input, uint8 (C, H, W): the single decoding rule shared by
the preprocess stage (image folders), `imgclf-predict` and serving, so a model sees at
prediction time exactly what it was trained on.

The rule: decode (Pillow), turn upright by the EXIF orientation, scale 16-bit gray down to 8
bits, composite transparency onto a background (the data set's `transparency` rule, below), convert
to `channels` (1: gray, 3: RGB), then resize to (height, width) by the data set's policy:
- `pad`: scale to fit inside, centre, fill the border with black (nothing cut, nothing distorted);
- `crop`: scale to cover, keep the centre (nothing distorted, the edges may be cut);
- `stretch`: scale each side on its own (what the built-in data sets and older models use).

Transparency: `auto` puts each image on the background that contrasts with what it shows (white
behind dark content, black behind light content, judged by the visible pixels' mean luminance),
so a dark glyph on a transparent background stays visible; `#rrggbb` puts every image on that
colour (as the model sees it, i.e. after `invert`). Models from before the rule was recorded saw
black (`LEGACY_TRANSPARENCY`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("pad", "crop", "stretch")
# Models trained before the policy was recorded saw stretched images.
DEFAULT_RESIZE = "stretch"
TRANSPARENCY_AUTO = "auto"
# Models trained before the transparency rule was recorded saw transparent pixels as black.
LEGACY_TRANSPARENCY = "#000000"
# Below this alpha-weighted mean luminance (0-255) content counts as dark, so goes on white.
_DARK_CONTENT = 128
# (Nearly) uniform: at most this share of pixels differs from the median by more than _STANDS_OUT.
_UNIFORM_SHARE, _STANDS_OUT = 0.01, 16


class ImageError(Exception):
    """A file that cannot become an image; str() is the reason, without the path."""


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _background(img: Image.Image, rule: str, invert: bool) -> tuple[int, int, int, int]:
    """The RGBA colour to composite `img` (RGBA) onto, before the optional inversion."""
    if rule == TRANSPARENCY_AUTO:
        rgba = np.asarray(img, dtype=np.float32)
        weight = rgba[..., 3] / 255.0
        visible = float(weight.sum())
        if visible == 0:  # nothing visible: whatever the background, the image is blank
            return (0, 0, 0, 255)
        luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        dark = float((luminance * weight).sum()) / visible < _DARK_CONTENT
        # Chosen on the file's own colours: inversion flips content and background together.
        return (255, 255, 255, 255) if dark else (0, 0, 0, 255)
    r, g, b = (int(rule[i:i + 2], 16) for i in (1, 3, 5))
    # The colour is what the model sees: before an inversion it is the opposite one.
    return (255 - r, 255 - g, 255 - b, 255) if invert else (r, g, b, 255)


def is_uniform(pixels: np.ndarray) -> bool:
    """Whether an image (any shape, uint8) shows (nearly) nothing: at most 1% of its pixels
    differ by more than 16 gray levels from its median, so noise and a stray pixel don't count
    as content."""
    # From the histogram: a sort (np.median) of every pixel costs several times more.
    counts = np.cumsum(np.bincount(pixels.reshape(-1), minlength=256))
    median = int(np.searchsorted(counts, (counts[-1] + 1) // 2))
    near = counts[min(255, median + _STANDS_OUT)] - (counts[median - _STANDS_OUT - 1] if median > _STANDS_OUT else 0)
    return int(counts[-1] - near) <= _UNIFORM_SHARE * counts[-1]


def to_pixels(img: Image.Image, in_shape: tuple[int, int, int], invert: bool = False,
              resize: str = DEFAULT_RESIZE, transparency: str = LEGACY_TRANSPARENCY) -> np.ndarray:
    """One decoded image as the model's raw input: uint8 (C, H, W)."""
    channels, height, width = in_shape
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit gray (PNG, TIFF): PIL's convert("L") clips everything above 255 to white; scale instead.
        high = np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8
        img = Image.fromarray(high.astype(np.uint8), "L")
    if _has_alpha(img):
        # A transparent pixel's colour is arbitrary (often white): only the rule decides what
        # the model sees there.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, _background(rgba, transparency, invert)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        size, method = (width, height), Image.Resampling.BILINEAR
        if resize == "pad":
            img = ImageOps.pad(img, size, method=method, color=255 if invert else 0)
        elif resize == "crop":
            img = ImageOps.fit(img, size, method=method)
        else:
            img = img.resize(size, method)
    pixels = np.asarray(img, dtype=np.uint8)
    if invert:
        pixels = 255 - pixels
    pixels = pixels[np.newaxis] if channels == 1 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)


def decode(source: Path | bytes, in_shape: tuple[int, int, int], invert: bool = False,
           resize: str = DEFAULT_RESIZE, formats: Sequence[str] | None = None,
           transparency: str = LEGACY_TRANSPARENCY) -> np.ndarray:
    """Read one image (a path or its bytes); raise ImageError with the reason it cannot be used.

    `formats` limits the decoders that may run (None: every format Pillow reads).
    """
    return decode_with_alpha(source, in_shape, invert, resize, formats, transparency)[0]


def decode_with_alpha(source: Path | bytes, in_shape: tuple[int, int, int], invert: bool = False,
                      resize: str = DEFAULT_RESIZE, formats: Sequence[str] | None = None,
                      transparency: str = LEGACY_TRANSPARENCY) -> tuple[np.ndarray, bool]:
    """As `decode`, and whether the file had transparency (preprocess compares such images with
    the opaque ones)."""
    if isinstance(source, bytes) and not source:
        raise ImageError("empty file")
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it, a "bomb" only warns: refuse those as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=formats) as img:
                img.load()
                # Cameras store pixels sideways and say so in EXIF; the model wants them upright.
                upright = ImageOps.exif_transpose(img)
                return to_pixels(upright, in_shape, invert, resize, transparency), _has_alpha(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too many pixels to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        if formats:
            raise ImageError(f"not a {' or '.join(formats)} image (those are the formats allowed)") from None
        raise ImageError("not an image (no decoder of Pillow's reads it)") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports damaged files as any of these (SyntaxError: "broken PNG file").
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"damaged or truncated image ({reason})") from None
