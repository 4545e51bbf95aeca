"""Open a source once and stream its frames; refuse what cannot be curated with a clear reason.

`probe` checks everything that can be known before decoding (exists, non-empty, a container with a
video stream, a sane size and duration). `stream_frames` then decodes each frame exactly once, in
bounded memory; the chain turns each frame into the small copies its steps need.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av

from curation.config import DecodeConfig


class SourceError(Exception):
    """A source that cannot be curated. The flow records it as an error row and carries on."""


@dataclass
class SourceInfo:
    path: str
    fps: float
    width: int
    height: int
    duration_s: float | None
    codec: str
    expected_frames: int | None


def probe(path: str | Path, config: DecodeConfig | None = None) -> SourceInfo:
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
    try:
        with av.open(str(path)) as container:
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
    except SourceError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise SourceError(f"not a readable video: {_short(error)}") from None
    if min(info.width, info.height) < config.min_side:
        raise SourceError(
            f"resolution {info.width}x{info.height} is below the minimum side of {config.min_side} px "
            "(setting decode.min_side)"
        )
    if info.duration_s is not None and info.duration_s > config.max_duration_s:
        raise SourceError(
            f"duration {info.duration_s:.0f} s exceeds decode.max_duration_s={config.max_duration_s:.0f}"
        )
    return info


def stream_frames(path: str | Path, threads: str = "AUTO") -> Iterator[av.VideoFrame]:
    """Decode the first video stream frame by frame (each frame once, nothing retained).

    A decode error mid-stream raises SourceError naming the frame, so a truncated or corrupt file
    becomes an error row instead of a silently shorter clip list.
    """
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise SourceError(f"not a readable video: {_short(error)}") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = threads
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
