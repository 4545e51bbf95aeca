"""Video in and out, once for the whole project: H.264/GIF writing, decoding the frames at given indices,
and the resize-to-cover + centre-crop every consumer of frames needs (training, walks, open_clip input,
the FVD protocol, the sample-data builder)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np


class NoVideoStreamError(ValueError):
    """A container without a video stream (an audio file, a renamed document)."""


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    *,
    crf: int = 20,
    gop: int = 25,
    scene_cut_keyframes: bool = False,
) -> int:
    """Encode RGB uint8 frames (H, W, 3) to an H.264 MP4; returns the number of frames written.

    `gop` fixes the keyframe interval; with `scene_cut_keyframes=False` the encoder places no extra
    keyframes at shot changes, which is what most uploaded footage looks like after re-encoding and
    what makes keyframe snapping in the clipper matter. Odd sizes use 4:4:4 chroma (4:2:0 needs even).
    x264's `veryfast` preset: these are sample, test and preview videos, not training clips.
    """

    def configure(stream: av.VideoStream, height: int, width: int) -> None:
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        x264_params = f"keyint={gop}:min-keyint={gop}" + ("" if scene_cut_keyframes else ":scenecut=0")
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": x264_params}

    return _encode(path, frames, fps, "libx264", configure)


def _encode(path: str | Path, frames: Iterable[np.ndarray], fps: float | Fraction, codec: str,
            configure: Callable[[av.VideoStream, int, int], None], container_format: str | None = None) -> int:
    """Frames through `codec` into `path`; `configure(stream, height, width)` sets the stream up from the first
    frame's size (frames are cropped to the size it sets). Returns the number of frames written."""
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                configure(stream, frame.shape[0], frame.shape[1])
            picture = np.ascontiguousarray(frame[:stream.height, :stream.width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode():
            container.mux(packet)
    return count


def save_video(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write one video's uint8 frames (T, H, W, 3) as H.264 MP4 or animated GIF (by extension)."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    elif path.suffix.lower() == ".mp4":
        even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        write_video(path, even, fps, crf=18, gop=max(1, round(fps)))
    else:
        raise ValueError(f"unsupported video extension {path.suffix!r}: use .mp4 or .gif")
    return path


def write_webm(path: str | Path, frames: Iterable[np.ndarray], fps: float | Fraction, *, crf: int = 24) -> int:
    """Encode RGB uint8 frames (H, W, 3) to a VP9 WebM (constant quality `crf`, 0-63, lower is better); returns
    the number of frames written. VP9 WebM plays in every current browser, which H.264 does not (Chromium builds
    without proprietary codecs, Firefox on some Linux systems). Odd sizes lose their last row/column (4:2:0)."""

    def configure(stream: av.VideoStream, height: int, width: int) -> None:
        stream.width, stream.height, stream.pix_fmt = width // 2 * 2, height // 2 * 2, "yuv420p"
        stream.options = {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}

    return _encode(path, frames, fps, "libvpx-vp9", configure, container_format="webm")


def read_frames(source: str | Path, max_frames: int | None = None) -> tuple[list[np.ndarray], float | None]:
    """All RGB uint8 frames of a video (the first `max_frames` when given), upright, and its average frame rate
    (None when the container does not say). A file without a video stream raises NoVideoStreamError."""
    with av.open(str(source)) as container:
        if not container.streams.video:
            raise NoVideoStreamError(f"{source}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = []
        for frame in container.decode(stream):
            frames.append(frame_rgb(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames, float(rate) if rate else None


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) that show `frame` as intended: the rotation of the display matrix a
    phone stores with portrait video (FFmpeg's convention, as ffmpeg and players apply it). Mirror flags of the
    matrix are not applied."""
    return round(frame.rotation / 90) % 4 if frame.rotation else 0


def upright(image: np.ndarray, turns: int) -> np.ndarray:
    """`image` (H, W, ...) turned `turns` quarter turns counter-clockwise (a contiguous copy; as is when 0)."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns % 4 else image


def display_matrix(frame: av.VideoFrame) -> list[int] | None:
    """The frame's display matrix (FFmpeg's nine 32-bit integers), for a re-encode to keep; None if it has none."""
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            return np.frombuffer(bytes(side_data), dtype=np.int32, count=9).tolist()
    return None


def frame_rgb(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a decoded frame as it is displayed (its rotation applied); `width` x `height`,
    when given, is the size of the displayed picture."""
    turns = quarter_turns(frame)
    if turns % 2:
        width, height = height, width
    return upright(frame.to_ndarray(width=width, height=height, format="rgb24"), turns)


def decode_frames_at(
    source: str | Path | bytes,
    indices: Sequence[int] | Callable[[float | None], Sequence[int]],
    *,
    threaded: bool = False,
) -> list[np.ndarray]:
    """RGB uint8 frames at `indices` (in that order, repeats allowed) of a file or encoded bytes, upright (the
    rotation a phone recorded in the display matrix is applied, as players do).

    `indices` may be a function of the stream's average frame rate (None when the container does not
    say), for callers that resample to a target fps. Decoding stops after the last wanted frame; frames
    past the end of the video are simply missing from the result, so callers compare its length with
    what they asked for. A file without a video stream raises NoVideoStreamError."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        if not container.streams.video:
            raise NoVideoStreamError(f"{source if isinstance(source, str | Path) else 'video bytes'}: no video stream")
        stream = container.streams.video[0]
        if threaded:
            stream.thread_type = "AUTO"
        if callable(indices):
            rate = stream.average_rate or stream.guessed_rate
            indices = indices(float(rate) if rate else None)
        if not len(indices):
            return []
        wanted, last = set(indices), max(indices)
        picked: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                picked[index] = frame_rgb(frame)
            if index >= last:
                break
    return [picked[i] for i in indices if i in picked]


def cover_crop_box(in_h: int, in_w: int, height: int, width: int) -> tuple[float, int, int, int, int]:
    """Geometry of resize-to-cover + centre-crop: (scale, resized height, resized width, top, left)."""
    scale = max(height / in_h, width / in_w)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    return scale, new_h, new_w, (new_h - height) // 2, (new_w - width) // 2


def resize_cover_crop(
    frames: np.ndarray,
    height: int,
    width: int,
    *,
    interpolation: Literal["auto", "area", "antialiased-bilinear"] = "auto",
    chunk: int = 64,
) -> np.ndarray:
    """Scale uint8 RGB frames (..., H, W, 3) so they cover height x width (aspect kept), then centre-crop;
    any leading dimensions (one frame, a clip, a batch of clips) are kept.

    `interpolation`: "auto" is OpenCV's area filter when shrinking and bicubic when enlarging (what
    open_clip's PIL preprocessing does, and what training and walks use); "area" is OpenCV's area filter
    both ways (the sample-data builder, whose footage must not change); "antialiased-bilinear" is torch's
    antialiased bilinear, batched `chunk` frames at a time (the UCF-101 FVD protocol's 320x576 -> 240x320)."""
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (..., H, W, 3), got {frames.dtype} {frames.shape}")
    in_h, in_w = frames.shape[-3:-1]
    scale, new_h, new_w, top, left = cover_crop_box(in_h, in_w, height, width)
    flat = frames.reshape(-1, in_h, in_w, 3)
    out = np.empty((len(flat), height, width, 3), dtype=np.uint8)
    if interpolation == "antialiased-bilinear":
        import torch
        import torch.nn.functional as F

        for start in range(0, len(flat), chunk):
            x = torch.from_numpy(flat[start : start + chunk]).permute(0, 3, 1, 2).float()
            if (new_h, new_w) != (in_h, in_w):
                x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
            x = x[:, :, top : top + height, left : left + width]
            out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    elif interpolation in ("auto", "area"):
        import cv2

        flag = cv2.INTER_AREA if interpolation == "area" or scale < 1 else cv2.INTER_CUBIC
        for i, frame in enumerate(flat):
            out[i] = cv2.resize(frame, (new_w, new_h), interpolation=flag)[top : top + height, left : left + width]
    else:
        raise ValueError(f"unknown interpolation {interpolation!r}: use 'auto', 'area' or 'antialiased-bilinear'")
    return out.reshape(*frames.shape[:-3], height, width, 3)
