"""One way an image enters the project (generation, walks, morphs, multi-view): read as a viewer displays it.

A conditioning image is what the user saw, so it is read the way an image viewer (and diffusers' `load_image`)
shows it, and every unusual encoding is turned into plain 8-bit RGB by a documented rule instead of Pillow's
default `convert("RGB")`, which clips or drops information silently:

* EXIF orientation is applied (a phone photo stored landscape with "rotate 90" is read portrait).
* 16-bit images (PNG/TIFF, grey or RGB) are scaled from 0..65535 to 0..255, not clipped.
* Float images (mode F, e.g. a float TIFF) are taken as 0..1 and clipped outside it.
* Transparency (RGBA, LA, a palette with a transparent index) is composited over white: objects cut out for
  image-to-video or multi-view sit on the white background SVD-MV and the Objaverse renders use.
* CMYK, YCbCr, grey and palette images are converted to RGB.

Before a byte is read the source is checked: a local path must be a regular file (not a FIFO, a device such as
/dev/zero, or a directory) of at most `MAX_IMAGE_BYTES`, and the decoded size is checked against
`MAX_IMAGE_PIXELS` from the header, so a hostile file is refused in one line instead of filling memory.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np

MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a 16-bit 8K TIFF is ~200 MB; anything bigger is not a conditioning image
MAX_IMAGE_PIXELS = 100_000_000  # 100 MP, about 1.2 GB as 32-bit RGBA while converting


class ImageError(ValueError):
    """An image that cannot be used; the one-line message names the source and the reason."""


def read_image(source: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
    """`source` (a local file or an fsspec URL such as s3://, https://, memory://) as an 8-bit RGB PIL image,
    oriented and scaled as displayed (see the module docstring). Raises ImageError with a one-line message."""
    import PIL.Image

    data = _read_checked(str(source), max_bytes)
    try:
        with warnings.catch_warnings():  # the size is checked below against our own limit
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError:
        raise ImageError(f"image {source}: its size is outside 1..{max_pixels:,} pixels") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"image {source}: not an image Pillow can open (unknown or damaged format)") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises several types for bad headers
        raise ImageError(f"image {source}: not an image Pillow can open ({_one_line(error)})") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageError(f"image {source}: its size {width}x{height} is outside 1..{max_pixels:,} pixels")
    try:
        image.load()
        return to_displayed_rgb(image)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ImageError(f"image {source}: damaged pixel data ({_one_line(error)})") from None


def to_displayed_rgb(image: Any):
    """A loaded PIL image as 8-bit RGB, oriented by its EXIF tag, 16-bit and float scaled, alpha over white."""
    import PIL.Image
    import PIL.ImageOps

    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64) / 257.0  # 16-bit full scale 65535 -> 255
        return _grey_to_rgb(grey)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64) * 255.0
        return _grey_to_rgb(grey)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "RGBa", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image).convert("RGB")
    if image.mode in ("RGB;16", "RGB;16B", "RGBA;16B"):  # kept for Pillow builds that expose 16-bit colour modes
        rgb = np.asarray(image, dtype=np.float64)[..., :3] / 257.0
        return PIL.Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray):
    import PIL.Image

    if not np.isfinite(grey).all():
        raise ImageError("image has non-finite (NaN or infinite) pixel values")
    values = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.repeat(values[..., None], 3, axis=2), "RGB")


def _read_checked(source: str, max_bytes: int) -> bytes:
    """The source's bytes, after checking its kind and size without reading it."""
    if "://" not in source:
        path = Path(source)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise ImageError(f"image {source}: no such file") from None
        except OSError as error:
            raise ImageError(f"image {source}: cannot read it ({_one_line(error)})") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise ImageError(f"image {source}: {kind}")
        _check_size(source, info.st_size, max_bytes)
        try:
            with open(path, "rb") as handle:
                return handle.read(max_bytes + 1)
        except OSError as error:
            raise ImageError(f"image {source}: cannot read it ({_one_line(error)})") from None
    import fsspec

    try:
        with fsspec.open(source, "rb") as handle:
            size = getattr(handle, "size", None)
            if size is not None:
                _check_size(source, int(size), max_bytes)
            data = handle.read(max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image {source}: no such file") from None
    except Exception as error:  # noqa: BLE001 - any transport failure is the same user error
        raise ImageError(f"image {source}: cannot read it ({_one_line(error)})") from None
    _check_size(source, len(data), max_bytes)
    return data


def _check_size(source: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise ImageError(f"image {source}: the file is empty")
    if size > max_bytes:
        raise ImageError(f"image {source}: {size:,} bytes is larger than the {max_bytes:,}-byte limit for an image")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
