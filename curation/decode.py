"""Open a source once and stream its frames; refuse what cannot be curated with a clear reason.

`probe` checks everything that can be known before decoding (exists, non-empty, a container with a
video stream, a sane size and duration). `stream_frames` then decodes each frame exactly once, in
bounded memory; the chain turns each frame into the small copies its steps need.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from curation.config import DecodeConfig


class SourceError(Exception):
    """A source that cannot be curated. The flow records it as an error row and carries on."""


# Faults of the machine, not of the input: disk full, quota, file size limit, read-only or failing storage,
# timeouts, no memory. A source that meets one is not committed (not even as an error row): the run fails
# naming it, and a rerun retries it.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ETIMEDOUT,
                            errno.ENOMEM, errno.ENOBUFS, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH,
                            errno.ENETUNREACH, errno.ESTALE})


def is_storage_fault(error: BaseException) -> bool:
    """Whether `error` is a fault of the machine or its storage (retry later) rather than of the input."""
    if isinstance(error, TimeoutError | MemoryError):
        return True
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


class StorageFault(OSError):
    """A storage or OS fault met while curating one source; its message names the source."""


@dataclass
class SourceInfo:
    path: str
    fps: float
    width: int
    height: int
    duration_s: float | None
    codec: str
    expected_frames: int | None


# libavutil's refusal of a frame size it cannot allocate. When FFmpeg refuses the size a header claims, the stream
# reports 0x0 (or the file does not open at all), and this message is the only place the claimed size survives.
_REFUSED_SIZE = re.compile(r"Picture size (\d+)x(\d+) is invalid")
_log_lock = threading.Lock()
_log_users = 0
_saved_log_settings: tuple[int | None, bool] = (None, True)


@contextlib.contextmanager
def ffmpeg_messages() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's warnings and errors raised by this thread inside the block, as (level, component, message).

    PyAV drops FFmpeg's log by default; it is switched on (warnings and worse, repeats kept) only while at
    least one thread is inside such a block, and each thread collects its own messages.
    """
    global _log_users, _saved_log_settings
    with _log_lock:
        if _log_users == 0:
            _saved_log_settings = (av.logging.get_level(), av.logging.get_skip_repeated())
            if _saved_log_settings[0] is None:
                av.logging.set_level(av.logging.WARNING)
            av.logging.set_skip_repeated(False)
        _log_users += 1
    try:
        with av.logging.Capture() as messages:
            yield messages
    finally:
        with _log_lock:
            _log_users -= 1
            if _log_users == 0:
                level, skip_repeated = _saved_log_settings
                av.logging.set_level(level)
                av.logging.set_skip_repeated(skip_repeated)


def _refused_size(messages: list[tuple[int, str, str]], config: DecodeConfig) -> SourceError | None:
    """The error for a header whose frame size FFmpeg refused (too large to allocate), naming that size."""
    for _, _, message in messages:
        match = _REFUSED_SIZE.search(message)
        if match:
            width, height = int(match[1]), int(match[2])
            return _pixel_limit(width, height, config) or SourceError(
                f"resolution {width}x{height} claimed by the header is beyond what FFmpeg can decode")
    return None


def _pixel_limit(width: int, height: int, config: DecodeConfig) -> SourceError | None:
    if width * height <= config.max_pixels:
        return None
    return SourceError(
        f"resolution {width}x{height} ({width * height / 1e6:.1f} megapixels) exceeds "
        f"decode.max_pixels={config.max_pixels} ({config.max_pixels / 1e6:.1f} megapixels; default 8K UHD)"
    )


def probe(path: str | Path, config: DecodeConfig | None = None) -> SourceInfo:
    """What the header says of `path`, or SourceError when it cannot be curated (see `open_source`)."""
    info, container = open_source(path, config)
    container.close()
    return info


def open_source(path: str | Path, config: DecodeConfig | None = None) -> tuple[SourceInfo, av.container.InputContainer]:
    """Check everything that can be known before decoding and return the header's facts with the container
    left open, so that decoding does not open and probe the file a second time (a few ms per source, which
    is several per cent of a short source's work). SourceError when the source cannot be curated."""
    config = config or DecodeConfig()
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SourceError(f"unreadable path: broken symlink to {os.readlink(path)}")
    if not path.exists():
        raise SourceError("unreadable path: file does not exist")
    if not path.is_file():
        raise SourceError("unreadable path: not a regular file")
    if not os.access(path, os.R_OK):
        raise SourceError("unreadable path: permission denied")
    size = path.stat().st_size
    if size == 0:
        raise SourceError("empty file (0 bytes)")
    with ffmpeg_messages() as messages:
        info, container = _read_header(path, config, messages)
    try:
        _check_header(info, messages, config)
    except BaseException:
        container.close()
        raise
    return info, container


def _check_header(info: SourceInfo, messages: list[tuple[int, str, str]], config: DecodeConfig) -> None:
    if info.width <= 0 or info.height <= 0:
        raise _refused_size(messages, config) or SourceError(
            "the decoder reports no frame size: the header claims a size it cannot decode or the stream is broken")
    refusal = _pixel_limit(info.width, info.height, config)
    if refusal:
        raise refusal
    if min(info.width, info.height) < config.min_side:
        raise SourceError(
            f"resolution {info.width}x{info.height} is below the minimum side of {config.min_side} px "
            "(setting decode.min_side)"
        )
    if info.duration_s is not None and info.duration_s > config.max_duration_s:
        raise SourceError(
            f"duration {info.duration_s:.0f} s exceeds decode.max_duration_s={config.max_duration_s:.0f}"
        )


def _read_header(path: Path, config: DecodeConfig,
                 messages: list[tuple[int, str, str]]) -> tuple[SourceInfo, av.container.InputContainer]:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise _refused_size(messages, config) or SourceError(f"not a readable video: {_short(error)}") from None
    try:
        if not container.streams.video:
            raise SourceError("no video stream in container")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise SourceError("video stream has no usable frame rate")
        duration_s = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000
        info = SourceInfo(
            path=str(path),
            fps=float(rate),
            width=int(stream.codec_context.width or 0),
            height=int(stream.codec_context.height or 0),
            duration_s=duration_s,
            codec=stream.codec_context.name,
            expected_frames=int(stream.frames) or None,
        )
    except BaseException as error:
        container.close()
        if isinstance(error, av.FFmpegError | UnicodeDecodeError | ValueError):
            raise _refused_size(messages, config) or SourceError(f"not a readable video: {_short(error)}") from None
        raise
    return info, container


def thread_budget(configured: int = 0) -> int:
    """CPU threads one source may use: `configured` when set, else the CPUs Ray gave this task (a task granted
    1 CPU that let FFmpeg start a thread per core would crowd the other tasks on its node), else the cores
    this process may run on."""
    if configured > 0:
        return configured
    ray = sys.modules.get("ray")  # only a process that imported Ray can be a Ray worker
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):  # the driver and non-task contexts have no assigned resources
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    return len(os.sched_getaffinity(0))


def decoder_threads(budget: int) -> int:
    """FFmpeg decoder threads for a budget of `budget` cores: one frame thread more than the cores when there
    are several (FFmpeg's own automatic choice), so a frame is being decoded while the chain works on the last;
    exactly one on a single core."""
    return budget + 1 if budget > 1 else 1


def stream_frames(path: str | Path, threads: int = 0,
                  container: av.container.InputContainer | None = None) -> Iterator[av.VideoFrame]:
    """Decode the first video stream frame by frame (each frame once, nothing retained), on
    `thread_budget(threads)` threads, from `container` (`open_source`'s, closed at the end) or from `path`.

    A decode error mid-stream raises SourceError naming the frame, so a truncated or corrupt file
    becomes an error row instead of a silently shorter clip list.
    """
    if container is None:
        try:
            container = av.open(str(path))
        except av.FFmpegError as error:
            raise SourceError(f"not a readable video: {_short(error)}") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads
        stream.codec_context.thread_count = decoder_threads(thread_budget(threads))
        index = 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    yield frame
                    index += 1
        except av.FFmpegError as error:
            raise SourceError(
                f"corrupt or truncated video: decoding failed after {index} frames: {_short(error)}"
            ) from None


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


FAST_FORMATS = ("yuv420p", "yuvj420p")


def _plane(frame: av.VideoFrame, index: int, width: int) -> np.ndarray:
    plane = frame.planes[index]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :width]


def _shrink(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize `plane` to `size` by exact 2x2 box averages (OpenCV's integer INTER_AREA path) while it is
    at least twice the target, then one bilinear step of less than 2x. As close to a true area average
    as OpenCV's general INTER_AREA (mean |difference| 0.5 grey levels) and 4x cheaper, which matters:
    it runs on every decoded frame (see benchmarks/curation.py)."""
    width, height = size
    while plane.shape[1] >= 2 * width and plane.shape[0] >= 2 * height:
        plane = cv2.resize(plane, (plane.shape[1] // 2, plane.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if plane.shape[1] == width and plane.shape[0] == height:
        return plane.copy()  # never a view of the decoder's frame buffer
    return cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR)


def analysis_copy(frame: av.VideoFrame, width: int, height: int, rgb: bool = False) -> np.ndarray:
    """A small BGR (or RGB) copy of a decoded frame; `width` and `height` must be even.

    For 4:2:0 video the three planes are shrunk with OpenCV and converted at the small size (BT.601
    video range, OpenCV's I420 path), several times cheaper than PyAV's full-size swscale conversion;
    this runs on every frame (see benchmarks/curation.py). Other pixel formats use swscale.
    """
    if frame.format.name not in FAST_FORMATS or width % 2 or height % 2:
        return frame.to_ndarray(width=width, height=height, format="rgb24" if rgb else "bgr24")
    packed = np.empty((height * 3 // 2, width), np.uint8)
    flat = packed.reshape(-1)
    luma_size, chroma_size = width * height, (width // 2) * (height // 2)
    packed[:height] = _shrink(_plane(frame, 0, frame.width), (width, height))
    chroma_width = (frame.width + 1) // 2
    for index, offset in ((1, luma_size), (2, luma_size + chroma_size)):
        plane = _shrink(_plane(frame, index, chroma_width), (width // 2, height // 2))
        flat[offset : offset + chroma_size] = plane.reshape(-1)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2RGB_I420 if rgb else cv2.COLOR_YUV2BGR_I420)
