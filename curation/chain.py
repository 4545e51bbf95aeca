"""Curate one source: decode it once and run every signal-processing step on that single stream.

For each decoded frame the chain makes one small BGR copy (`decode.analysis_width` wide) that the cut
cascade and the motion meter share, and every half second one RGB copy (long side
`decode.sample_long_side`) spooled to disk as JPEG for the learned scorers. After the stream ends it
knows the cuts, plans clips, writes them (`clips.method`: an exact stream copy with an edit list, a
keyframe-snapped copy or a re-encode), and returns the source row, one row per clip and the
first/middle/last frames of each clip (plus, while the video captioner is active, its
`scorers.video_caption.num_frames` frames spread over the clip, taken from the same samples: nothing is
decoded twice). Any failure becomes an error row.

A source with a display rotation (phones store portrait video sideways, with a display matrix) is curated as
it is shown: its rows carry the displayed width and height and the scorers' frames are upright; clip files
keep the rotation (stream copies carry the source's matrix, re-encodes copy it), so readers that apply it,
like `common.video.decode_frames_at` for training, see upright frames. The cut detectors and the motion meter
work on the stored orientation, which does not change what they measure.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from common.background import SerialWorker
from common.video import quarter_turns, upright
from curation.clipping import (
    MP4_COPYABLE_CODECS,
    CopiedRoll,
    DecodedSoFar,
    HeldFrames,
    LiveReencoder,
    plan_clips,
    shots_from_cuts,
    write_copied_clips,
    write_exact_clips,
    write_reencoded_clips,
)
from curation.config import ClipConfig, CurationConfig
from curation.cuts import CutCascade
from curation.decode import (
    SourceError,
    SourceInfo,
    StorageFault,
    analysis_copy,
    is_storage_fault,
    open_source,
    stream_frames,
    thread_budget,
)
from curation.filtering import DECODE_ERRORS
from curation.motion import MotionMeter
from curation.types import ClipFrames
from dataformat import SOURCE_COLUMNS, clip_file_name, clip_id, source_id, source_label


@dataclass
class SourceResult:
    source_row: dict[str, Any]
    clip_rows: list[dict[str, Any]] = field(default_factory=list)
    clip_frames: list[ClipFrames] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    second_pass_clips: int = 0  # re-encoded clips the live re-encoder did not produce (written by a second pass)


def error_result(relative_path: str, message: str) -> SourceResult:
    row = dict.fromkeys(SOURCE_COLUMNS)
    row.update(source=source_label(relative_path), status="error", error=message, cuts=[])
    return SourceResult(source_row=row)


def damaged_ranges(corrupt: list[int], keyframes: list[int], num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [start, end) that a corrupt frame spoils: its whole group of pictures, from the keyframe
    before it to the next one. The decoder flags only the frame whose data was bad; it conceals the damage,
    and the frames predicted from it (before and after it in display order) carry the broken blocks on."""
    ranges = []
    for index in corrupt:
        start = max((k for k in keyframes if k <= index), default=0)
        end = min((k for k in keyframes if k > index), default=num_frames)
        if not ranges or ranges[-1] != (start, end):
            ranges.append((start, end))
    return ranges


def spread_frames(start: int, end: int, count: int) -> list[int]:
    """`count` frame indices at the centres of `count` equal segments of [start, end): the video
    captioner's view of a clip (the usual segment sampling of video-captioning models)."""
    length = max(end - start, 1)
    return [start + min(int((i + 0.5) * length / count), length - 1) for i in range(count)]


def clip_time(frame_index: int, frame_times: list[float | None], fps: float) -> float:
    """Seconds from the first frame to frame `frame_index` (the end of the last frame when it is one past the
    end), from presentation timestamps: frame / fps is wrong for variable-frame-rate video. Falls back to
    frame / fps when the stream has no timestamps."""
    if not frame_times or any(time is None for time in frame_times):
        return frame_index / fps
    start = frame_times[0]
    if frame_index < len(frame_times):
        return frame_times[frame_index] - start
    last_step = frame_times[-1] - frame_times[-2] if len(frame_times) > 1 else 1.0 / fps
    return frame_times[-1] - start + (frame_index - len(frame_times) + 1) * last_step


def analysis_size(width: int, height: int, target_width: int) -> tuple[int, int]:
    target_width = min(target_width, width) - min(target_width, width) % 2
    target_height = max(2, round(height * target_width / width / 2) * 2)
    return max(2, target_width), target_height


class FrameSpool:
    """Half-second samples kept as JPEG in a temporary file: bounded memory for any length. The samples are
    shrunk and encoded on a thread of their own (OpenCV releases the GIL) while the chain decodes on."""

    def __init__(self, directory: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - unlinked at once; closed in close()
        self.index: list[tuple[int, int, int]] = []  # (frame, offset, length)
        self._worker: SerialWorker | None = SerialWorker("frame-spool", queued=4)

    def add(self, frame_index: int, frame: av.VideoFrame, size: tuple[int, int], turns: int) -> None:
        """Keep decoded frame `frame_index` at `size` (stored orientation), turned upright by `turns`."""
        self._worker.submit(self._store, frame_index, frame, size, turns)

    def _store(self, frame_index: int, frame: av.VideoFrame, size: tuple[int, int], turns: int) -> None:
        bgr = upright(analysis_copy(frame, *size), turns)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError("JPEG encoding of a sampled frame failed")
        offset = self.file.seek(0, 2)
        self.file.write(data.tobytes())
        self.index.append((frame_index, offset, len(data)))

    def nearest(self, frame_index: int, start: int, end: int) -> np.ndarray:
        """The sample closest to `frame_index`, preferring samples inside [start, end) (RGB)."""
        if self._worker is not None:  # every sample is in: the chain has decoded the whole source
            self._worker.join()
            self._worker = None
        inside = [entry for entry in self.index if start <= entry[0] < end] or self.index
        frame, offset, length = min(inside, key=lambda entry: abs(entry[0] - frame_index))
        self.file.seek(offset)
        data = np.frombuffer(self.file.read(length), dtype=np.uint8)
        return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
        self.file.close()


def chain_steps(path: Path, config: CurationConfig, steps: set[str] | frozenset[str]) -> int:
    """The per-frame chain of `decode_and_analyse` up to `steps` ("analysis", "cuts", "motion"), with the real
    classes and no clip files or spool: what each step costs, for benchmarks/curation.py and cost_model.py.
    Returns the number of decoded frames."""
    info, container = open_source(path, config.decode)  # one open, as in decode_and_analyse
    analysis_width, analysis_height = analysis_size(info.width, info.height, config.decode.analysis_width)
    cascade, motion = CutCascade(config.cuts, info.fps), MotionMeter(config.motion, info.fps)
    count = 0
    for index, frame in enumerate(stream_frames(path, config.decode.threads, container)):
        count += 1
        if "analysis" not in steps:
            continue
        analysis = analysis_copy(frame, analysis_width, analysis_height)
        if "cuts" in steps:
            cascade.push(index, analysis)
        if "motion" in steps and motion.wants(index):
            motion.push(index, analysis)
    if "cuts" in steps:
        cascade.finish()
    return count


def process_source(path: Path, relative_path: str, clips_dir: Path, config: CurationConfig) -> SourceResult:
    """Never raises for a bad source: the result then carries an error row and no clips. A fault of the
    machine (disk full, I/O error, timeout: `is_storage_fault`) is raised as StorageFault naming the source."""
    try:
        return _process(Path(path), relative_path, Path(clips_dir), config)
    except SourceError as error:
        return error_result(relative_path, str(error))
    except Exception as error:  # noqa: BLE001 - one bad clip never kills a run
        if is_storage_fault(error):
            raise storage_fault(relative_path, error) from error
        return error_result(relative_path, f"{type(error).__name__}: {error}")


def storage_fault(relative_path: str, error: BaseException) -> StorageFault:
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return StorageFault(getattr(error, "errno", None) or 0,
                        f"{reason} while curating {source_label(relative_path)!r} (not committed; a rerun retries it)")


@dataclass
class Analysis:
    """What one decode pass learns about a source: everything but the clip files."""

    info: SourceInfo
    num_frames: int
    cuts: list[int]
    keyframes: list[int]
    frame_pts: list[int]
    frame_times: list[float | None]  # presentation times (s): variable-frame-rate sources need them
    corrupt: list[int]
    motion: MotionMeter
    spool: FrameSpool
    live: LiveReencoder | None  # the shots it re-encoded while decoding
    turns: int = 0  # quarter turns counter-clockwise that show the frames upright (a phone's display matrix)


def decode_and_analyse(path: Path, config: CurationConfig, work_dir: Path, live_clips: bool = True) -> Analysis:
    """Decode `path` once: analysis copies for the cut cascade and the motion meter, scorer samples to a
    spool in `work_dir`, and (with `live_clips`) every frame to a live re-encoder writing there, once the
    cascade has settled whether a cut falls on it. The caller closes the spool and discards the live
    re-encoder's leftovers."""
    info, container = open_source(path, config.decode)
    try:
        return _decode_and_analyse(path, container, info, config, work_dir, live_clips)
    finally:
        container.close()  # already closed once decoding ran to the end


def _decode_and_analyse(path: Path, container: av.container.InputContainer, info: SourceInfo,
                        config: CurationConfig, work_dir: Path, live_clips: bool) -> Analysis:
    cascade = CutCascade(config.cuts, info.fps)
    keyframes: list[int] = []
    ahead = DecodedSoFar(keyframes, cascade.is_cut_so_far)
    width, height = analysis_size(info.width, info.height, config.decode.analysis_width)
    scale = min(1.0, config.decode.sample_long_side / max(info.width, info.height))
    sample_size = (max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2))
    motion = MotionMeter(config.motion, info.fps)
    held = HeldFrames(cascade.settle_frames)
    work_dir.mkdir(parents=True, exist_ok=True)
    spool = FrameSpool(work_dir)
    try:
        live = _live_reencoder(info, work_dir, config, ahead, cascade.settle_frames) if live_clips else None
    except BaseException:
        spool.close()
        raise
    analysis = Analysis(info, 0, [], keyframes, [], [], [], motion, spool, live)

    def take(index: int, frame: av.VideoFrame) -> None:
        """Everything the chain does with one decoded frame, in frame order on the analyser thread."""
        if index == 0:
            analysis.turns = quarter_turns(frame)
        if frame.key_frame:
            analysis.keyframes.append(index)
        if frame.is_corrupt:
            analysis.corrupt.append(index)
        analysis.frame_pts.append(frame.pts if frame.pts is not None else -1)
        analysis.frame_times.append(frame.time)
        small = analysis_copy(frame, width, height)
        cascade.push(index, small)
        if motion.wants(index):
            motion.push(index, small)
            spool.add(index, frame, sample_size, analysis.turns)
        if live is not None:
            ahead.frames = index + 1
            for held_index, held_frame in held.add(index, frame):
                live.push(held_index, held_frame)

    # The decoder runs on this thread and the per-frame analysis on its own, so the decoder is fed its next
    # packets while a frame is analysed.
    analyser = SerialWorker("chain-analysis", queued=8)
    try:
        index = -1
        try:
            for index, frame in enumerate(stream_frames(path, config.decode.threads, container)):
                analyser.submit(take, index, frame)
        finally:
            analyser.stop()
        analyser.join()
        analysis.num_frames = num_frames = index + 1
        if num_frames < config.decode.min_frames:
            raise SourceError(
                f"only {num_frames} decodable frame(s); at least {config.decode.min_frames} needed "
                "(setting decode.min_frames)"
            )
        if info.expected_frames and num_frames < 0.9 * info.expected_frames:
            raise SourceError(f"truncated video: decoded {num_frames} of {info.expected_frames} frames")
        analysis.cuts = cascade.finish()
        if live is not None:
            ahead.is_cut, ahead.ended = set(analysis.cuts).__contains__, True
            for held_index, held_frame in held.drain():
                live.push(held_index, held_frame)
            live.finish(num_frames)
    except BaseException:
        spool.close()
        if live is not None:
            live.discard()
        raise
    return analysis


def clip_method(info: SourceInfo, config: CurationConfig, frame_pts: list[int] | None = None) -> str:
    """The method that cuts this source's clips: `clips.method`, or `reencode` where a copy cannot be right (a
    codec an MP4 cannot carry; packets without timestamps to route them by)."""
    method = config.clips.method
    if info.codec not in MP4_COPYABLE_CODECS:  # either copy would fail to mux
        return "reencode"
    if frame_pts is not None and -1 in frame_pts:
        return "reencode"
    return method


def _live_reencoder(info: SourceInfo, clips_dir: Path, config: CurationConfig, ahead: DecodedSoFar,
                    settle_frames: int) -> LiveReencoder | None:
    """A live re-encoder, or None when no shot will be re-encoded but by exception (exact copies: the few are
    written by a second pass) or when holding `settle_frames` decoded frames back would take more than
    `clips.lookahead_mb` (then re-encoded clips come from a second decode pass)."""
    method = clip_method(info, config)
    if method == "exact-copy":
        return None
    held_bytes = settle_frames * info.width * info.height * 1.5  # 4:2:0
    if held_bytes > config.clips.lookahead_mb * 2**20:
        return None
    clip_config = ClipConfig(**{**dataclasses.asdict(config.clips), "method": method})
    return LiveReencoder(clips_dir, info.width, info.height, info.fps, clip_config, ahead,
                         thread_budget(config.decode.threads))


def _process(path: Path, relative_path: str, clips_dir: Path, config: CurationConfig) -> SourceResult:
    timings = {"decode_and_analyse": 0.0, "clip_write": 0.0}
    started = time.perf_counter()
    analysis = decode_and_analyse(path, config, clips_dir)
    try:
        return _clips_and_rows(analysis, path, relative_path, clips_dir, config, timings, started)
    finally:
        if analysis.live is not None:
            analysis.live.discard()


def _clips_and_rows(analysis: Analysis, path: Path, relative_path: str, clips_dir: Path, config: CurationConfig,
                    timings: dict[str, float], started: float) -> SourceResult:
    live = analysis.live
    info, num_frames, cuts, keyframes = analysis.info, analysis.num_frames, analysis.cuts, analysis.keyframes
    frame_pts, frame_times, motion, spool = analysis.frame_pts, analysis.frame_times, analysis.motion, analysis.spool
    try:
        timings["decode_and_analyse"] = time.perf_counter() - started  # with live re-encoding, when it runs

        shots = shots_from_cuts(cuts, num_frames)
        damaged = damaged_ranges(analysis.corrupt, keyframes, num_frames)
        plans = plan_clips(shots, keyframes, num_frames, info.fps, config.clips, clip_method(info, config, frame_pts))
        for plan in plans:
            if plan.method == "exact-copy" and any(a < plan.end_frame and plan.start_frame < b for a, b in damaged):
                plan.method = "reencode"  # another decoder may conceal the damage differently: keep what ours saw
        sid = source_id(relative_path)
        named = [(plan, clips_dir / clip_file_name(clip_id(sid, i))) for i, plan in enumerate(plans)]

        started = time.perf_counter()
        write_copied_clips(path, [(p, f) for p, f in named if p.method == "keyframe"], frame_pts)
        rolls, not_exact = write_exact_clips(path, [(p, f) for p, f in named if p.method == "exact-copy"], frame_pts,
                                             keyframes)
        for plan, _ in not_exact:
            plan.method = "reencode"
        second_pass = []
        for plan, file in named:
            if plan.method != "reencode":
                continue
            written = live.take(plan) if live is not None else None
            if written is not None:
                written.replace(file)
            else:
                second_pass.append((plan, file))
        write_reencoded_clips(path, second_pass, frame_pts, keyframes, info.fps, config.clips,
                              thread_budget(config.decode.threads))
        timings["clip_write"] = time.perf_counter() - started
        turns = analysis.turns
        width, height = (info.height, info.width) if turns % 2 else (info.width, info.height)  # as displayed

        result = SourceResult(
            source_row={
                "source": source_label(relative_path),
                "status": "ok",
                "error": None,
                "num_frames": num_frames,
                "fps": info.fps,
                "width": width,
                "height": height,
                "duration_s": num_frames / info.fps,
                "cuts": cuts,
            },
            timings=timings,
            second_pass_clips=len(second_pass),
        )
        video_frame_count = config.scorers.spooled_video_frames()
        for plan, file in named:
            clip = file.stem
            middle = (plan.start_frame + plan.end_frame) // 2
            broken = any(start < plan.end_frame and plan.start_frame < end for start, end in damaged)
            result.clip_rows.append(
                {
                    "clip_id": clip,
                    "source": source_label(relative_path),
                    "start_frame": plan.start_frame,
                    "end_frame": plan.end_frame,
                    "start_s": clip_time(plan.start_frame, frame_times, info.fps),
                    "end_s": clip_time(plan.end_frame, frame_times, info.fps),
                    "fps": info.fps,
                    "width": width,
                    "height": height,
                    "clip_method": plan.method,
                    **dataclasses.asdict(rolls.get(file, CopiedRoll())),
                    "clip_path": str(file),
                    "motion_score": motion.score(plan.start_frame, plan.end_frame),
                    "drop_reasons": [DECODE_ERRORS] if broken else [],
                }
            )
            picks = (plan.start_frame, middle, plan.end_frame - 1)
            frames = np.stack([spool.nearest(f, plan.start_frame, plan.end_frame) for f in picks])
            video_frames = None
            if video_frame_count:
                spread = spread_frames(plan.start_frame, plan.end_frame, video_frame_count)
                video_frames = np.stack([spool.nearest(f, plan.start_frame, plan.end_frame) for f in spread])
            result.clip_frames.append(ClipFrames(clip_id=clip, frames=frames, video_frames=video_frames))
        return result
    finally:
        spool.close()
