"""Turn shots into clip files: stream copy between keyframes when possible, re-encode otherwise.

A stream-copied clip must start on a keyframe, so a shot [s, e) becomes [first keyframe >= s,
last keyframe <= e) (or e itself at the end of the source): the cut is snapped to keyframes that do not
cross it, nothing is re-encoded, and no frame of the neighbouring shot leaks in (docs/recipe.md §1). When that
leaves less than `min_clip_s` of a long-enough shot (sparse keyframes), the exact shot is re-encoded
instead and the clip is marked `reencode`.

Re-encoded clips are written while the source decodes (`LiveReencoder`): the chain holds each decoded
frame back until the cut cascade has settled whether a cut falls on it, then feeds it to the encoder of
its shot; a shot that turns out to hold enough keyframes to be copied drops its encoder. `plan_clips`
stays the one truth: a planned clip the live pass did not produce exactly (a cut that settled late) is
re-encoded by `write_reencoded_clips` in one more decode pass.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from common.video import display_matrix
from curation.config import ClipConfig


@dataclass
class ClipPlan:
    start_frame: int
    end_frame: int  # exclusive
    method: str  # 'copy' | 'reencode'
    shot_index: int


def shots_from_cuts(cuts: list[int], num_frames: int) -> list[tuple[int, int]]:
    bounds = [0, *[c for c in cuts if 0 < c < num_frames], num_frames]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _split_evenly(start: int, end: int, max_frames: int) -> list[tuple[int, int]]:
    pieces = -(-(end - start) // max_frames)
    edges = [start + round(i * (end - start) / pieces) for i in range(pieces + 1)]
    return list(zip(edges, edges[1:], strict=False))


def _split_at_keyframes(start: int, end: int, keyframes: list[int], max_frames: int) -> list[tuple[int, int]]:
    """Greedy: each piece ends on the farthest keyframe that keeps it within max_frames."""
    pieces, position = [], start
    while end - position > max_frames:
        lo = bisect.bisect_right(keyframes, position)
        hi = bisect.bisect_right(keyframes, position + max_frames)
        inside = keyframes[lo:hi]
        if inside:
            cut = inside[-1]
        elif lo < len(keyframes) and keyframes[lo] < end:
            cut = keyframes[lo]  # GOP longer than max_clip_s: the piece overshoots rather than re-encoding
        else:
            break
        pieces.append((position, cut))
        position = cut
    pieces.append((position, end))
    return pieces


def plan_clips(
    shots: list[tuple[int, int]], keyframes: list[int], num_frames: int, fps: float, config: ClipConfig
) -> list[ClipPlan]:
    min_frames = max(1, round(config.min_clip_s * fps))
    max_frames = max(min_frames, round(config.max_clip_s * fps))
    keyframes = sorted(keyframes)
    plans: list[ClipPlan] = []
    for shot_index, (start, end) in enumerate(shots):
        if end - start < min_frames:
            continue
        copy_range = None
        if config.stream_copy:
            first = bisect.bisect_left(keyframes, start)
            snapped_start = keyframes[first] if first < len(keyframes) else None
            if end == num_frames:
                snapped_end = end
            else:
                last = bisect.bisect_right(keyframes, end) - 1
                snapped_end = keyframes[last] if last >= 0 else None
            if snapped_start is not None and snapped_end is not None and snapped_end - snapped_start >= min_frames:
                copy_range = (snapped_start, snapped_end)
        if copy_range:
            for a, b in _split_at_keyframes(*copy_range, keyframes, max_frames):
                if b - a >= min_frames:
                    plans.append(ClipPlan(a, b, "copy", shot_index))
        else:
            for a, b in _split_evenly(start, end, max_frames):
                if b - a >= min_frames:
                    plans.append(ClipPlan(a, b, "reencode", shot_index))
    return plans


def write_copied_clips(source: Path, plans: list[tuple[ClipPlan, Path]], frame_pts: list[int]) -> None:
    """One demux pass (no decoding) routes whole GOPs to each copy clip's file."""
    if not plans:
        return
    by_start = {frame_pts[plan.start_frame]: (plan, path) for plan, path in plans}
    end_pts = {id(plan): frame_pts[plan.end_frame] if plan.end_frame < len(frame_pts) else None for plan, _ in plans}
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        current = None  # (plan, output container, output stream, pts offset)
        try:
            for packet in container.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue
                if packet.is_keyframe and current is not None and packet.pts == end_pts[id(current[0])]:
                    current[1].close()
                    current = None
                if packet.is_keyframe and packet.pts in by_start and current is None:
                    plan, path = by_start[packet.pts]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    output = av.open(str(path), mode="w")
                    out_stream = output.add_stream_from_template(stream)
                    current = (plan, output, out_stream, packet.pts)
                if current is None:
                    continue
                _, output, out_stream, offset = current
                packet.pts = None if packet.pts is None else packet.pts - offset
                packet.dts = None if packet.dts is None else packet.dts - offset
                packet.stream = out_stream
                output.mux(packet)
        finally:
            if current is not None:
                current[1].close()


class _ClipEncoder:
    """One H.264 clip file fed with decoded frames as they are (no RGB round trip)."""

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int, preset: str) -> None:
        rate = Fraction(fps).limit_denominator(1001)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.output = av.open(str(path), mode="w")
        self.stream = self.output.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"  # 4:2:0 needs even
        gop = max(1, round(fps))  # 1-s GOPs: the clip can be cut again or seeked cheaply
        self.stream.options = {"crf": str(crf), "preset": preset,
                               "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        self.time_base = Fraction(1) / rate
        self.count = 0

    def add(self, frame: av.VideoFrame) -> None:
        if self.count == 0:
            matrix = display_matrix(frame)
            if matrix:  # the clip keeps the source's rotation, as a stream copy does
                self.stream.set_display_matrix(matrix)
        if frame.format.name != self.stream.pix_fmt:
            frame = frame.reformat(format=self.stream.pix_fmt)
        frame.pts, frame.time_base = self.count, self.time_base
        frame.pict_type = av.video.frame.PictureType.NONE  # the source's I-frames must not force keyframes here
        for packet in self.stream.encode(frame):
            self.output.mux(packet)
        self.count += 1

    def close(self) -> int:
        try:
            for packet in self.stream.encode():
                self.output.mux(packet)
        finally:
            self.output.close()
        return self.count


def write_reencoded_clips(
    source: Path,
    plans: list[tuple[ClipPlan, Path]],
    frame_pts: list[int],
    keyframes: list[int],
    fps: float,
    crf: int,
    preset: str,
) -> None:
    """Re-encode the exact frames [start, end) of each plan, all clips of the source in one decode pass.

    The clips are written in frame order from one decoder: a frame is decoded at most once (seeking to a
    clip's keyframe only when that skips frames no clip needs), where a decode per clip re-decoded the
    GOP prefix before each clip. Decoded frames go to x264 in their own pixel format.
    """
    if not plans:
        return
    index_of = {pts: index for index, pts in enumerate(frame_pts)}
    keyframes = sorted(keyframes)
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        decoded = container.decode(stream)
        position = -1  # index of the last frame taken from `decoded`
        for plan, path in sorted(plans, key=lambda item: item[0].start_frame):
            before = bisect.bisect_right(keyframes, plan.start_frame) - 1
            if before >= 0 and keyframes[before] > position + 1:  # a keyframe ahead: jump instead of decoding
                container.seek(frame_pts[keyframes[before]], stream=stream, backward=True, any_frame=False)
                decoded = container.decode(stream)
            encoder = _ClipEncoder(path, width, height, fps, crf, preset)
            try:
                for frame in decoded:
                    index = index_of.get(frame.pts)
                    if index is None:
                        continue
                    position = index
                    if index >= plan.start_frame:
                        encoder.add(frame)
                    if index >= plan.end_frame - 1:
                        break
            finally:
                written = encoder.close()
            if written != plan.end_frame - plan.start_frame:
                raise RuntimeError(f"re-encode wrote {written} frames, expected {plan.end_frame - plan.start_frame}")


class LiveReencoder:
    """Re-encode shots from the chain's own decoded frames, so re-encoded clips cost no second decode.

    `push` takes every frame in order once it is `delay` frames old (by then the cascade has almost always
    settled whether a cut falls on it); each shot gets an encoder from its first frame on, dropped as soon
    as the shot holds two keyframes at least `min_clip_s` apart (`plan_clips` will stream-copy it) or
    grows past `max_clip_s` (a re-encoded long shot is split evenly, which needs its length: left to the
    second pass). `take` hands over the file of a finished shot that matches a planned clip exactly.
    """

    def __init__(self, directory: Path, width: int, height: int, fps: float, config: ClipConfig) -> None:
        self.directory = directory
        self.size = (width, height)
        self.fps = fps
        self.config = config
        self.min_frames = max(1, round(config.min_clip_s * fps))
        self.max_frames = max(self.min_frames, round(config.max_clip_s * fps))
        self.finished: dict[tuple[int, int], Path] = {}
        self._start = -1
        self._first_keyframe: int | None = None
        self._encoder: _ClipEncoder | None = None
        self._path: Path | None = None
        self._dropped = True  # no shot open yet

    def push(self, index: int, frame: av.VideoFrame, starts_shot: bool) -> None:
        if starts_shot or self._start < 0:
            self._end_shot(index)
            self._start, self._first_keyframe, self._dropped = index, None, False
        if self._dropped:
            return
        if frame.key_frame and self.config.stream_copy:
            if self._first_keyframe is None:
                self._first_keyframe = index
            elif index - self._first_keyframe >= self.min_frames:
                self._drop()  # keyframes enough to stream-copy this shot
                return
        if index - self._start >= self.max_frames:
            self._drop()
            return
        if self._encoder is None:
            self._path = self.directory / f".live-{self._start:09d}.mp4"
            self._encoder = _ClipEncoder(self._path, *self.size, self.fps, self.config.reencode_crf,
                                         self.config.reencode_preset)
        self._encoder.add(frame)

    def finish(self, num_frames: int) -> None:
        self._end_shot(num_frames)

    def take(self, plan: ClipPlan) -> Path | None:
        return self.finished.pop((plan.start_frame, plan.end_frame), None)

    def discard(self) -> None:
        """Remove files nobody took (shots that were copied, too short, or cut differently in the end)."""
        self._drop()
        for path in self.finished.values():
            path.unlink(missing_ok=True)
        self.finished.clear()

    def _end_shot(self, end: int) -> None:
        if self._encoder is not None and not self._dropped:
            written = self._encoder.close()
            if written == end - self._start:
                self.finished[(self._start, end)] = self._path
            else:
                self._path.unlink(missing_ok=True)
            self._encoder = None
        self._dropped = True

    def _drop(self) -> None:
        if self._encoder is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                self._encoder.close()
            self._path.unlink(missing_ok=True)
            self._encoder = None
        self._dropped = True


class HeldFrames:
    """The decoded frames of the last `delay` indices, released oldest first (the live re-encoder's lag)."""

    def __init__(self, delay: int) -> None:
        self.delay = delay
        self.frames: deque[tuple[int, av.VideoFrame]] = deque()

    def add(self, index: int, frame: av.VideoFrame) -> list[tuple[int, av.VideoFrame]]:
        self.frames.append((index, frame))
        released = []
        while len(self.frames) > self.delay:
            released.append(self.frames.popleft())
        return released

    def drain(self) -> list[tuple[int, av.VideoFrame]]:
        released = list(self.frames)
        self.frames.clear()
        return released
