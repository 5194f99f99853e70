"""One image file -> the model's raw input, uint8 (C, H, W): the single decoding rule shared by
the preprocess stage (image folders), `imgclf-predict` and serving, so a model sees at
prediction time exactly what it was trained on.

The rule: decode (Pillow), turn upright by the EXIF orientation, scale 16-bit gray down to 8
bits, composite transparency onto black background, convert to `channels` (1: gray, 3: RGB),
then resize to (height, width) by the data set's policy:
- `pad`: scale to fit inside, centre, fill the border with black (nothing cut, nothing distorted);
- `crop`: scale to cover, keep the centre (nothing distorted, the edges may be cut);
- `stretch`: scale each side on its own (what the built-in data sets and older models use).
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


class ImageError(Exception):
    """A file that cannot become an image; str() is the reason, without the path."""


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_pixels(img: Image.Image, in_shape: tuple[int, int, int], invert: bool = False,
              resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """One decoded image as the model's raw input: uint8 (C, H, W)."""
    channels, height, width = in_shape
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit gray (PNG, TIFF): PIL's convert("L") clips everything above 255 to white; scale instead.
        high = np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8
        img = Image.fromarray(high.astype(np.uint8), "L")
    if _has_alpha(img):
        # A transparent pixel's colour is arbitrary (often white): it is background, and the
        # model's background is black, so it must come out black after the optional inversion.
        background = (255, 255, 255, 255) if invert else (0, 0, 0, 255)
        img = Image.alpha_composite(Image.new("RGBA", img.size, background), img.convert("RGBA"))
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
           resize: str = DEFAULT_RESIZE, formats: Sequence[str] | None = None) -> np.ndarray:
    """Read one image (a path or its bytes); raise ImageError with the reason it cannot be used.

    `formats` limits the decoders that may run (None: every format Pillow reads).
    """
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
                return to_pixels(ImageOps.exif_transpose(img), in_shape, invert, resize)
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
