"""Sources for the exact-clip tests, encoded here with PyAV so each has one property a stream copy must survive:
B-frames (decode order differs from display order), open GOPs (frames after a keyframe that refer to the GOP
before it), a variable frame rate, a display rotation, an audio track, codecs other than H.264 and containers
other than MP4."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, FRAMES = 96, 64, 60


@dataclass(frozen=True)
class GeneratedSource:
    codec: str
    options: dict[str, str]
    frame_times_ms: tuple[int, ...] | None = None  # None: 25 fps
    rotation: int = 0  # display rotation (degrees counter-clockwise)
    audio: bool = False
    suffix: str = ".mp4"  # the container
    leading_pictures: int = 0  # open GOPs: pictures after a keyframe in decode order, shown before it


X264_BFRAMES = "keyint=24:min-keyint=24:scenecut=0:bframes=3:b-adapt=0:b-pyramid=normal"
SOURCES = {
    "h264_bframes_audio": GeneratedSource("libx264", {"x264-params": X264_BFRAMES}, audio=True),
    "h264_open_gop": GeneratedSource("libx264", {"x264-params": X264_BFRAMES + ":open-gop=1"}, leading_pictures=3),
    "h264_vfr": GeneratedSource("libx264", {"x264-params": X264_BFRAMES},
                                frame_times_ms=tuple(int(t) for t in np.cumsum([0] + [30, 45, 60] * 20)[:FRAMES])),
    "h264_rotated": GeneratedSource("libx264", {"x264-params": X264_BFRAMES}, rotation=-90),
    "hevc_bframes": GeneratedSource("libx265", {"x265-params": "keyint=24:min-keyint=24:scenecut=0:bframes=3:"
                                                               "b-adapt=0:log-level=error"}, leading_pictures=3),
    "vp9": GeneratedSource("libvpx-vp9", {"g": "24", "deadline": "realtime", "cpu-used": "8", "crf": "30",
                                          "b": "0"}),
    "h264_matroska": GeneratedSource("libx264", {"x264-params": X264_BFRAMES}, suffix=".mkv"),
    "mpeg4_avi": GeneratedSource("mpeg4", {"g": "24", "bf": "2", "qscale": "4"}, suffix=".avi", leading_pictures=2),
    "mpeg2_ts": GeneratedSource("mpeg2video", {"g": "24", "bf": "2", "qscale": "4"}, suffix=".ts", leading_pictures=2),
}


def synthetic_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A picture that moves fast enough that every frame differs clearly from its neighbours (a frame shown
    one off is caught), with some texture so that the encoder predicts rather than repeats."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(index)
    red = (x * 4 + index * 23) % 256
    green = (y * 5 + index * 37) % 256
    blue = ((x + y) * 3 + index * 11) % 256
    picture = np.stack([red, green, blue], axis=-1) + rng.integers(0, 16, (height, width, 1))
    return np.clip(picture, 0, 255).astype(np.uint8)


def write_source(path: Path, source: GeneratedSource, frames: int = FRAMES) -> Path:
    with av.open(str(path), mode="w") as container:
        if source.frame_times_ms is None:
            stream = container.add_stream(source.codec, rate=25)
            time_base = Fraction(1, 25)
        else:
            stream = container.add_stream(source.codec, rate=30)
            time_base = Fraction(1, 1000)
            stream.codec_context.time_base = time_base
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = source.options
        if source.rotation:
            stream.set_display_rotation(source.rotation)
        audio = container.add_stream("aac", rate=16000) if source.audio else None
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index), format="rgb24")
            frame.pts = index if source.frame_times_ms is None else source.frame_times_ms[index]
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio is not None:
            samples = np.sin(np.arange(16000 * frames // 25) * 2 * np.pi * 440 / 16000).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode(None))
    return path


@dataclass
class DecodedSource:
    pts: list[int]
    times: list[float]
    keyframes: list[int]
    rgb: list[np.ndarray]  # as stored (rotation not applied)
    rotation: int
    reordered: bool  # some packet is decoded before a frame shown earlier (B-frames)


def decode_source(path: Path) -> DecodedSource:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        reordered = any(packet.pts is not None and packet.dts is not None and packet.pts > packet.dts
                        for packet in container.demux(stream))
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    keyframes = [i for i, f in enumerate(frames) if f.key_frame]
    return DecodedSource([f.pts for f in frames], [float(f.time) for f in frames], keyframes,
                         [f.to_ndarray(format="rgb24") for f in frames], frames[0].rotation, reordered)
