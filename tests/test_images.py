"""Conditioning images are read as a viewer displays them, and hostile sources are refused before a byte is read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import ImageError, read_image
from generation.generate import load_image
from generation.walk import load_image as load_walk_image


def _quadrants(height: int = 40, width: int = 60) -> np.ndarray:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation is visible."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2:] = (0, 255, 0)
    image[height // 2:, : width // 2] = (0, 0, 255)
    image[height // 2:, width // 2:] = (255, 255, 255)
    return image


def test_exif_orientation_is_applied_as_displayed(tmp_path: Path) -> None:
    """A phone photo stored landscape with EXIF orientation 6 ("rotate 90 clockwise to display") is read portrait,
    with the stored top-left corner at the displayed top-right, as diffusers' load_image and every viewer show it."""
    stored = _quadrants()
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=98, exif=exif)

    shown = np.asarray(read_image(path))
    assert shown.shape == (60, 40, 3)  # portrait: the stored 40x60 turned a quarter
    expected = np.rot90(stored, k=-1)  # 90 degrees clockwise
    assert np.abs(shown.astype(int) - expected.astype(int)).mean() < 6
    assert tuple(shown[5, -5]) == pytest.approx((255, 0, 0), abs=12)  # stored top-left (red) is now top-right
    # Every entry point reads it the same way: the image-to-video loader and the walk/morph loader.
    assert np.array_equal(np.asarray(load_image(path)), shown)
    morph = load_walk_image(path, 60, 40)
    assert morph.shape == (3, 60, 40) and float(morph[0, 2, -3]) > 0.9 and float(morph[1, 2, -3]) < -0.9


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """A 0..65535 gradient PNG becomes a 0..255 gradient (Pillow's convert('RGB') makes it nearly white)."""
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored 16-bit

    shown = np.asarray(read_image(path))
    assert shown.shape == (8, 256, 3)
    assert np.array_equal(shown[..., 0], shown[..., 2])
    assert np.abs(shown[0, :, 0].astype(int) - np.rint(gradient[0] / 257).astype(int)).max() <= 1
    assert shown[0, 0, 0] == 0 and shown[0, -1, 0] == 255 and abs(int(shown[0, 128, 0]) - 128) <= 1


def test_float_images_are_taken_as_zero_to_one(tmp_path: Path) -> None:
    values = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    shown = np.asarray(read_image(path))[..., 0]
    assert shown[0, 0] == 0 and shown[0, -1] == 255 and abs(int(shown[0, 32]) - round(32 / 63 * 255)) <= 1


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    """A cut-out object (RGBA, and a palette image with a transparent index) sits on white, not black."""
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (200, 30, 30, 255)  # opaque red square, fully transparent elsewhere
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    shown = np.asarray(read_image(tmp_path / "cutout.png"))
    assert tuple(shown[10, 10]) == (200, 30, 30) and tuple(shown[18, 18]) == (255, 255, 255)
    assert abs(int(shown[0, 0, 0]) - 127) <= 2

    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    index_of_black = palette.getpixel((18, 18))
    palette.save(tmp_path / "palette.png", transparency=index_of_black)
    shown = np.asarray(read_image(tmp_path / "palette.png"))
    assert tuple(shown[18, 18]) == (255, 255, 255) and shown[10, 10, 0] > 150


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "empty", "too large", "too many pixels"])
def test_hostile_sources_are_refused_before_reading(tmp_path: Path, kind: str) -> None:
    """/dev/zero, a FIFO nobody writes to, a directory, an empty file, a file over the byte limit (sparse, so
    nothing is written) and a header claiming a huge size: one-line errors, nothing read into memory, no hang."""
    if kind == "device":
        source, message = Path("/dev/zero"), "not a regular file"
    elif kind == "fifo":
        source = tmp_path / "pipe.png"
        os.mkfifo(source)
        message = "not a regular file"
    elif kind == "directory":
        source, message = tmp_path, "a directory"
    elif kind == "empty":
        source = tmp_path / "empty.png"
        source.touch()
        message = "empty"
    elif kind == "too large":
        source = tmp_path / "huge.png"
        with open(source, "wb") as handle:
            handle.truncate(300 * 1024 * 1024)  # sparse: no data written
        message = "larger than"
    else:
        source = tmp_path / "bomb.png"
        Image.new("L", (12_000, 10_000)).save(source, optimize=True)  # 120 MP of zeros: a few hundred KB
        message = "is outside 1..100,000,000 pixels"

    outcome: dict[str, BaseException] = {}

    def read() -> None:
        try:
            read_image(source)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)  # a FIFO opened for reading would block forever
    assert not reader.is_alive(), "read_image blocked on the source instead of refusing it"
    error = outcome.get("error")
    assert isinstance(error, ImageError) and message in str(error) and "\n" not in str(error)
    assert str(source) in str(error)


def test_damaged_and_non_image_files_are_one_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_quadrants()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    for source, message in ((truncated, "damaged"), (text, "not an image Pillow can open"),
                            (tmp_path / "missing.png", "no such file")):
        with pytest.raises(ImageError, match=message) as caught:
            read_image(source)
        assert "\n" not in str(caught.value)
