"""Turn shots into clip files, by `clips.method` (docs/exact-clips.md).

`exact-copy` (the default): the packets from the keyframe at or before a shot's first frame through the last
packet its last frame needs are stream-copied, and an MP4 edit list shows exactly the shot
(`write_exact_clips`, `curation.mp4_edit`): nothing is re-encoded and no frame is lost. Shots a copy cannot
show exactly (see `write_exact_clips` and the chain) are re-encoded and marked `reencode`.

`keyframe`: a stream-copied clip must start on a keyframe, so a shot [s, e) becomes [first keyframe >= s,
last keyframe <= e) (or e itself at the end of the source): the cut is snapped to keyframes that do not
cross it, nothing is re-encoded, and no frame of the neighbouring shot leaks in (docs/recipe.md §1). When that
leaves less than `min_clip_s` of a long-enough shot (sparse keyframes), the exact shot is re-encoded
instead and the clip is marked `reencode`.

Re-encoded clips are written while the source decodes (`LiveReencoder`, for the `keyframe` and `reencode`
methods): the chain holds each decoded frame back until the cut cascade has settled whether a cut falls on
it, then feeds it to the encoder of its shot; a shot that turns out to hold enough keyframes to be copied
drops its encoder. `plan_clips` stays the one truth: a planned clip the live pass did not produce exactly (a
cut that settled late, or an exact copy's exception) is re-encoded by `write_reencoded_clips` in one more
decode pass.
"""

from __future__ import annotations

import bisect
import contextlib
import io
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType

from common.background import SerialWorker
from common.video import display_matrix
from curation.config import ClipConfig
from curation.decode import decoder_threads
from curation.mp4_edit import set_presentation


@dataclass
class ClipPlan:
    start_frame: int
    end_frame: int  # exclusive
    method: str  # 'exact-copy' | 'keyframe' | 'reencode'
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


def _split_for_exact_copy(start: int, end: int, keyframes: list[int], min_frames: int,
                          max_frames: int) -> list[tuple[int, int]]:
    """Pieces of at most max_frames, each ending on a keyframe where one leaves both sides min_frames long (the
    next piece then needs no pre-roll), evenly otherwise."""
    pieces, position = [], start
    while end - position > max_frames:
        lo = bisect.bisect_left(keyframes, position + min_frames)
        hi = bisect.bisect_right(keyframes, min(position + max_frames, end - min_frames))
        if hi <= lo:
            return pieces + _split_evenly(position, end, max_frames)
        pieces.append((position, keyframes[hi - 1]))
        position = keyframes[hi - 1]
    return [*pieces, (position, end)]


def plan_clips(
    shots: list[tuple[int, int]], keyframes: list[int], num_frames: int, fps: float, config: ClipConfig,
    method: str | None = None,
) -> list[ClipPlan]:
    """The clips of a source's shots, cut by `method` (default: `config.method`).

    `exact-copy`: the exact shot, split at keyframes (or evenly) when longer than `max_clip_s`; a piece
    before the source's first keyframe has nothing to copy from and is re-encoded. `keyframe`: the shot
    snapped inwards to keyframes; when that leaves less than `min_clip_s` the exact shot is re-encoded.
    `reencode`: the exact shot, split evenly."""
    method = method or config.method
    min_frames = max(1, round(config.min_clip_s * fps))
    max_frames = max(min_frames, round(config.max_clip_s * fps))
    keyframes = sorted(keyframes)
    plans: list[ClipPlan] = []
    for shot_index, (start, end) in enumerate(shots):
        if end - start < min_frames:
            continue
        if method == "exact-copy":
            for a, b in _split_for_exact_copy(start, end, keyframes, min_frames, max_frames):
                copyable = bool(keyframes) and keyframes[0] <= a
                if b - a >= min_frames:
                    plans.append(ClipPlan(a, b, "exact-copy" if copyable else "reencode", shot_index))
            continue
        copy_range = None
        if method == "keyframe":
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
                    plans.append(ClipPlan(a, b, "keyframe", shot_index))
        else:
            for a, b in _split_evenly(start, end, max_frames):
                if b - a >= min_frames:
                    plans.append(ClipPlan(a, b, "reencode", shot_index))
    return plans


def write_copied_clips(source: Path, plans: list[tuple[ClipPlan, Path]], frame_pts: list[int]) -> None:
    """One demux pass (no decoding) routes whole GOPs to each keyframe-snapped clip's file."""
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


# Codecs an MP4 file carries (ISO/IEC 14496-12/-14/-15 and the AV1 and VP9 bindings) and libavformat muxes:
# a stream of one of these is copied into exact clips; any other is re-encoded.
MP4_COPYABLE_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4", "mpeg2video", "mpeg1video", "vvc"})


@dataclass
class CopiedRoll:
    """What an exact copy holds beyond its shot: frames decoded but not shown, before it and after it."""

    pre_roll_frames: int = 0
    post_roll_frames: int = 0
    pre_roll_bytes: int = 0
    post_roll_bytes: int = 0


@dataclass
class _ExactCopy:
    plan: ClipPlan
    path: Path
    start_pts: int  # the shot's first frame
    end_pts: int  # where the shot's last frame ends
    missing: set[int]  # the shot's frames whose packets have not been copied yet
    roll: CopiedRoll
    output: av.container.OutputContainer | None = None
    out_stream: av.VideoStream | None = None


def write_exact_clips(source: Path, plans: list[tuple[ClipPlan, Path]], frame_pts: list[int],
                      keyframes: list[int]) -> tuple[dict[Path, CopiedRoll], list[tuple[ClipPlan, Path]]]:
    """Stream-copy each shot exactly, all clips of the source in one demux pass (no decoding).

    A clip holds the packets, in decode order, from the keyframe at or before the shot's first frame up to
    the last packet one of the shot's frames needs (with B-frames, frames shown after the shot may come
    before it in decode order: the post-roll). The timestamps are shifted so that the shot's first frame is
    at 0: the pre-roll's are negative, and libavformat's MP4 muxer writes an edit list that starts the
    presentation there; `mp4_edit.set_presentation` ends it where the shot's last frame ends. Readers that
    apply edit lists (libavformat: PyAV, OpenCV, ffmpeg, Chromium) then decode exactly the shot.

    Returns the pre-/post-roll of each clip written, and the plans that cannot be copied exactly (a packet
    shown inside the shot that the source's decode did not produce, or the source ending early): the
    caller re-encodes those."""
    if not plans:
        return {}, []
    keyframes = sorted(keyframes)
    last_duration = frame_pts[-1] - frame_pts[-2] if len(frame_pts) > 1 else 1
    waiting: dict[int, list[_ExactCopy]] = {}  # keyframe pts -> the copies that start there
    for plan, path in plans:
        key = keyframes[bisect.bisect_right(keyframes, plan.start_frame) - 1]
        end_pts = frame_pts[plan.end_frame] if plan.end_frame < len(frame_pts) else frame_pts[-1] + last_duration
        copy = _ExactCopy(plan, path, frame_pts[plan.start_frame], end_pts,
                          set(frame_pts[plan.start_frame : plan.end_frame]), CopiedRoll())
        waiting.setdefault(frame_pts[key], []).append(copy)
    written: dict[Path, CopiedRoll] = {}
    failed: list[tuple[ClipPlan, Path]] = []
    active: list[_ExactCopy] = []
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                if packet.is_keyframe and packet.pts in waiting:
                    for copy in waiting.pop(packet.pts):
                        copy.path.parent.mkdir(parents=True, exist_ok=True)
                        copy.output = av.open(str(copy.path), mode="w", format="mp4")
                        copy.out_stream = copy.output.add_stream_from_template(stream)
                        active.append(copy)
                if not active:
                    if not waiting:
                        break
                    continue
                if packet.duration == 0 and last_duration:  # a muxer guesses the last sample's length from it
                    packet.duration = last_duration
                data = bytes(packet)
                for copy in list(active):
                    if packet.pts in copy.missing:
                        copy.missing.discard(packet.pts)
                    elif copy.start_pts <= packet.pts < copy.end_pts:  # shown in the shot, yet never decoded
                        _abandon(copy)
                        active.remove(copy)
                        failed.append((copy.plan, copy.path))
                        continue
                    elif packet.pts < copy.start_pts:
                        copy.roll.pre_roll_frames += 1
                        copy.roll.pre_roll_bytes += len(data)
                    else:
                        copy.roll.post_roll_frames += 1
                        copy.roll.post_roll_bytes += len(data)
                    _mux_shifted(copy, packet, data, time_base)
                    if not copy.missing:
                        copy.output.close()
                        copy.output = None
                        set_presentation(copy.path, Fraction(copy.end_pts - copy.start_pts) * time_base)
                        written[copy.path] = copy.roll
                        active.remove(copy)
        except BaseException:
            for copy in active:
                _abandon(copy)
            raise
    for copy in active + [copy for copies in waiting.values() for copy in copies]:  # the source ended early
        _abandon(copy)
        failed.append((copy.plan, copy.path))
    return written, failed


def _mux_shifted(copy: _ExactCopy, packet: av.Packet, data: bytes, time_base: Fraction) -> None:
    """A copy of `packet` into the clip, its timestamps shifted so the shot's first frame is at 0."""
    out = av.Packet(data)
    out.pts = packet.pts - copy.start_pts
    out.dts = None if packet.dts is None else packet.dts - copy.start_pts
    out.duration = packet.duration
    out.is_keyframe = packet.is_keyframe
    out.time_base = time_base
    out.stream = copy.out_stream
    copy.output.mux(out)


def _abandon(copy: _ExactCopy) -> None:
    if copy.output is not None:
        with contextlib.suppress(av.FFmpegError, OSError):
            copy.output.close()
        copy.output = None
    copy.path.unlink(missing_ok=True)


QUEUED_FRAMES = 16  # decoded frames waiting for the encoder thread (at 4K, ~200 MB)


class ClipEncoder:
    """One x264 encoder for every re-encoded clip of a source, each clip its own MP4 file.

    Opening an encoder per clip cost more than encoding a short clip's frames (thread start-up, lookahead
    fill and drain), so the clips of a source share one: `begin` forces an IDR frame at the clip's first
    frame, x264's own 1-s GOPs restart there, and nothing after an IDR refers back past it (closed GOPs), so
    the packets from one IDR up to the next clip's IDR are a complete stream for that clip's file. Packets
    come out `threads` frames late (x264's frame threads, which run without the GIL, beside the decoder and
    the analysis); each is routed to its clip by its timestamp, and a clip's file is closed when the next
    clip's first packet arrives. `abandon` drops the current clip (its packets are discarded, its file
    removed). `close` flushes and returns the number of frames written per file.

    The encoding runs on a thread of its own fed through a short queue: x264 returns a frame only once an
    earlier one is done, and the decoder and the cut cascade go on meanwhile. An error there (a full disk)
    is raised by the next call.
    """

    def __init__(self, width: int, height: int, fps: float, crf: int, preset: str, threads: int = 1) -> None:
        rate = Fraction(fps).limit_denominator(1001)
        self.time_base = Fraction(1) / rate
        self.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"  # 4:2:0 needs even sizes
        self.size = (width, height)
        # The encoder is a stream of an MP4 container that is never written: MP4 wants the parameter sets out of
        # band (global header), and the clip files' streams take their codec settings from this one.
        self._template_container = av.open(io.BytesIO(), mode="w", format="mp4")
        self.stream = self._template_container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, self.pix_fmt
        gop = max(1, round(fps))  # 1-s GOPs: a clip can be cut again or seeked cheaply
        self.stream.options = {"crf": str(crf), "preset": preset, "threads": str(max(1, threads)),
                               "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0"}
        self.clips: list[_EncodedClip] = []  # in encoding order, so their `first` timestamps ascend
        self._open: _EncodedClip | None = None  # the clip whose file receives packets now
        self._count = 0  # frames encoded so far (the encoder's timestamps)
        self._worker = SerialWorker("clip-encoder", QUEUED_FRAMES)

    def begin(self, path: Path) -> None:
        """Frames added from now on belong to a new clip written to `path`."""
        self._worker.submit(self._begin, path)

    def add(self, frame: av.VideoFrame) -> None:
        self._worker.submit(self._add, frame)

    def abandon(self) -> None:
        """Drop the current clip: no file, whatever was encoded of it is discarded."""
        self._worker.submit(self._abandon)

    def close(self) -> dict[Path, int]:
        """Flush the encoder, close every file; frames written per kept clip file."""
        try:
            self._worker.join()
            self._route(self.stream.encode(None))
        finally:
            self._close_open()
            self._template_container.close()
        return {clip.path: clip.written for clip in self.clips if not clip.abandoned}

    def discard(self) -> None:
        """Close without flushing and remove every file (a failed source)."""
        self._worker.stop()
        with contextlib.suppress(av.FFmpegError, OSError):
            self._close_open()
        with contextlib.suppress(av.FFmpegError, OSError):
            self._template_container.close()
        for clip in self.clips:
            with contextlib.suppress(OSError):
                clip.path.unlink(missing_ok=True)

    def _begin(self, path: Path) -> None:
        self.clips.append(_EncodedClip(path, self._count))

    def _add(self, frame: av.VideoFrame) -> None:
        clip = self.clips[-1]
        if clip.abandoned:
            return
        if clip.frames == 0:
            clip.matrix = display_matrix(frame)
        if frame.format.name != self.pix_fmt:
            frame = frame.reformat(format=self.pix_fmt)
        frame.pts, frame.time_base = self._count, self.time_base
        # the clip starts with an IDR frame; the source's own I-frames must not force keyframes elsewhere
        frame.pict_type = PictureType.I if clip.frames == 0 else PictureType.NONE
        self._route(self.stream.encode(frame))
        clip.frames += 1
        self._count += 1

    def _abandon(self) -> None:
        clip = self.clips[-1]
        clip.abandoned = True
        if clip is self._open:
            self._close_open()

    def _route(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            clip = self.clips[bisect.bisect_right(self.clips, packet.pts, key=lambda c: c.first) - 1]
            if clip.abandoned:
                continue
            if clip is not self._open:
                self._close_open()  # closed GOPs: every packet of the earlier clip came before this one
                clip.start_file(self.stream, self.size, self.pix_fmt, self.time_base)
                self._open = clip
            packet.pts -= clip.first
            packet.dts = None if packet.dts is None else packet.dts - clip.first
            packet.stream = clip.out_stream
            clip.output.mux(packet)
            clip.written += 1

    def _close_open(self) -> None:
        clip, self._open = self._open, None
        if clip is not None:
            clip.output.close()
            if clip.abandoned:
                clip.path.unlink(missing_ok=True)


@dataclass
class _EncodedClip:
    path: Path
    first: int  # the encoder timestamp of its first frame
    frames: int = 0  # frames handed to the encoder
    written: int = 0  # packets written to its file
    abandoned: bool = False
    matrix: list[int] | None = None
    output: av.container.OutputContainer | None = None
    out_stream: av.VideoStream | None = None

    def start_file(self, template: av.VideoStream, size: tuple[int, int], pix_fmt: str, time_base: Fraction) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.output = av.open(str(self.path), mode="w")
        stream = self.output.add_stream_from_template(template, width=size[0], height=size[1], pix_fmt=pix_fmt)
        stream.codec_context.extradata = template.codec_context.extradata  # the parameter sets (SPS/PPS)
        stream.time_base = time_base
        if self.matrix:  # the clip keeps the source's rotation, as a stream copy does
            stream.set_display_matrix(self.matrix)
        self.out_stream = stream


def write_reencoded_clips(
    source: Path,
    plans: list[tuple[ClipPlan, Path]],
    frame_pts: list[int],
    keyframes: list[int],
    fps: float,
    config: ClipConfig,
    threads: int = 1,
) -> None:
    """Re-encode the exact frames [start, end) of each plan, all clips of the source in one decode pass.

    The clips are written in frame order from one decoder into one `ClipEncoder`: a frame is decoded at most
    once (seeking to a clip's keyframe only when that skips frames no clip needs), where a decode per clip
    re-decoded the GOP prefix before each clip. Decoded frames go to x264 in their own pixel format.
    """
    if not plans:
        return
    index_of = {pts: index for index, pts in enumerate(frame_pts)}
    keyframes = sorted(keyframes)
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = decoder_threads(threads)
        encoder = ClipEncoder(stream.codec_context.width, stream.codec_context.height, fps, config.reencode_crf,
                              config.reencode_preset, threads)
        try:
            decoded = container.decode(stream)
            position = -1  # index of the last frame taken from `decoded`
            ordered = sorted(plans, key=lambda item: item[0].start_frame)
            for plan, path in ordered:
                before = bisect.bisect_right(keyframes, plan.start_frame) - 1
                if before >= 0 and keyframes[before] > position + 1:  # a keyframe ahead: jump instead of decoding
                    container.seek(frame_pts[keyframes[before]], stream=stream, backward=True, any_frame=False)
                    decoded = container.decode(stream)
                encoder.begin(path)
                for frame in decoded:
                    index = index_of.get(frame.pts)
                    if index is None:
                        continue
                    position = index
                    if index >= plan.start_frame:
                        encoder.add(frame)
                    if index >= plan.end_frame - 1:
                        break
            written = encoder.close()
        except BaseException:
            encoder.discard()
            raise
    for plan, path in ordered:
        expected = plan.end_frame - plan.start_frame
        if written.get(path) != expected:
            raise RuntimeError(f"re-encode wrote {written.get(path)} frames, expected {expected}")


@dataclass
class DecodedSoFar:
    """What the decoder knows beyond the frame the live re-encoder is given (the chain keeps it current)."""

    keyframes: list[int]
    is_cut: Callable[[int], bool]  # where cuts fall, as far as they are known
    frames: int = 0  # frames decoded so far
    ended: bool = False  # `frames` is the source's length


class LiveReencoder:
    """Re-encode shots from the chain's own decoded frames, so re-encoded clips cost no second decode.

    `push` takes every frame in order once it is `delay` frames old (by then the cascade has almost always
    settled whether a cut falls on it); each shot becomes a clip of one shared `ClipEncoder` from its first
    frame on, unless the frames decoded beyond it show that `plan_clips` will not re-encode it (too short,
    or keyframes enough to stream-copy it), looked at again whenever a keyframe or the source's end comes
    in. A shot is also abandoned when it grows past `max_clip_s` (a re-encoded long shot is split evenly,
    which needs its length: left to the second pass). After `finish`, `take` hands over the file of a shot
    that matches a planned clip exactly. A shot whose only keyframe is its first one is encoded until the
    decoder reaches the next keyframe, cut or the source's end: until then it may still need re-encoding.
    """

    def __init__(self, directory: Path, width: int, height: int, fps: float, config: ClipConfig,
                 ahead: DecodedSoFar, threads: int = 1) -> None:
        self.directory = directory
        self.ahead = ahead
        self.config = config
        self.min_frames = max(1, round(config.min_clip_s * fps))
        self.max_frames = max(self.min_frames, round(config.max_clip_s * fps))
        self.encoder = ClipEncoder(width, height, fps, config.reencode_crf, config.reencode_preset, threads)
        self.finished: dict[tuple[int, int], Path] = {}
        self._shots: dict[Path, tuple[int, int]] = {}  # ended shots' files -> (start, end)
        self._start = -1
        self._known: tuple[int, bool] | None = None  # (keyframes, ended) when the shot was last looked at
        self._path: Path | None = None  # the current shot's file while it is being encoded
        self._dropped = True  # no shot open yet

    def push(self, index: int, frame: av.VideoFrame) -> None:
        """Frame `index`, `delay` frames behind the decoder (`self.ahead` says what the decoder knows)."""
        if self.ahead.is_cut(index) or self._start < 0:
            self._end_shot(index)
            self._start, self._dropped, self._known = index, False, None
        if self._dropped:
            return
        known = (len(self.ahead.keyframes), self.ahead.ended)
        if known != self._known:  # a keyframe or the source's end came in: look again
            self._known = known
            if not self._worth_encoding(self._start):
                self._drop()
                return
        if index - self._start >= self.max_frames:
            self._drop()
            return
        if self._path is None:
            self._path = self.directory / f".live-{self._start:09d}.mp4"
            self.encoder.begin(self._path)
        self.encoder.add(frame)

    def _worth_encoding(self, start: int) -> bool:
        """False when the frames decoded beyond `start` already show that `plan_clips` will make no
        re-encoded clip of the shot from `start`: it ends too soon for a clip, or it holds keyframes enough
        to be stream-copied (two at least `min_clip_s` apart before its next cut, or one that far before the
        end of the source)."""
        ahead, keyframes = self.ahead, self.ahead.keyframes
        next_cut = next((i for i in range(start + 1, ahead.frames) if ahead.is_cut(i)), None)
        end = next_cut if next_cut is not None else (ahead.frames if ahead.ended else None)
        if end is not None and end - start < self.min_frames:
            return False
        if self.config.method == "reencode":
            return True
        first = bisect.bisect_left(keyframes, start)
        if first == len(keyframes):
            return True
        if ahead.ended and end == ahead.frames:  # the shot runs to the source's end: copied up to it
            return end - keyframes[first] < self.min_frames
        second = bisect.bisect_left(keyframes, keyframes[first] + self.min_frames)
        return second == len(keyframes) or (end is not None and keyframes[second] > end)

    def finish(self, num_frames: int) -> None:
        self._end_shot(num_frames)
        written = self.encoder.close()
        for path, (start, end) in self._shots.items():
            if written.get(path) == end - start:
                self.finished[(start, end)] = path
            else:
                path.unlink(missing_ok=True)

    def take(self, plan: ClipPlan) -> Path | None:
        return self.finished.pop((plan.start_frame, plan.end_frame), None)

    def discard(self) -> None:
        """Remove files nobody took (shots that were copied, too short, or cut differently in the end)."""
        self.encoder.discard()
        for path in self.finished.values():
            path.unlink(missing_ok=True)
        self.finished.clear()

    def _end_shot(self, end: int) -> None:
        if self._path is not None and not self._dropped:
            self._shots[self._path] = (self._start, end)
        self._path = None
        self._dropped = True

    def _drop(self) -> None:
        if self._path is not None:
            self.encoder.abandon()
            self._path = None
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
