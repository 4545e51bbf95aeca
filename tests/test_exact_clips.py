"""Exact clips by stream copy + MP4 edit list: every clip decodes to exactly its shot's source frames, through
PyAV, OpenCV, the trainer's decode and a real browser; the edit-list module on its own; the method's planning."""

from __future__ import annotations

import functools
import http.server
import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from common.video import decode_frames_at, frame_rgb
from curation.chain import clip_method, process_source
from curation.clipping import ClipPlan, plan_clips, write_exact_clips
from curation.config import ClipConfig, CurationConfig
from curation.decode import SourceInfo
from curation.mp4_edit import Edit, MP4EditError, read_video_track, set_presentation
from tests.exact_clips_helpers import SOURCES, decode_source, synthetic_frame, write_source

# Each generated source is cut mid-GOP at both ends (keyframes every 24 frames), into clips that share GOPs.
PLANS = [(5, 29), (29, 43), (43, None)]


def opencv_frames(path: Path) -> tuple[list[np.ndarray], list[float]]:
    capture = cv2.VideoCapture(str(path))
    frames, times = [], []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
        times.append(capture.get(cv2.CAP_PROP_POS_MSEC))
    capture.release()
    return frames, times


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generated")
    return {name: write_source(root / f"{name}{source.suffix}", source) for name, source in SOURCES.items()}


@pytest.mark.parametrize("name", list(SOURCES))
def test_exact_copy_decodes_to_exactly_the_shot(generated, tmp_path, name):
    """PyAV, OpenCV and the trainer's decode (`decode_frames_at` on the clip's bytes) each read exactly the shot:
    same count, every pixel equal, timestamps from 0, the rotation kept; the roll counts what the edit hides."""
    source = generated[name]
    decoded = decode_source(source)
    assert decoded.keyframes == [0, 24, 48]
    assert decoded.reordered == (name != "vp9")  # B-frames: decode order differs from display order
    plans = [(ClipPlan(a, b or len(decoded.pts), "exact-copy", i), tmp_path / f"{i}.mp4")
             for i, (a, b) in enumerate(PLANS)]
    rolls, failed = write_exact_clips(source, plans, decoded.pts, decoded.keyframes)
    assert failed == []
    opencv_source, _ = opencv_frames(source)
    for plan, path in plans:
        start, end = plan.start_frame, plan.end_frame
        clip = decode_source(path)
        assert len(clip.rgb) == end - start
        assert all(np.array_equal(a, b) for a, b in zip(clip.rgb, decoded.rgb[start:end], strict=True))
        assert clip.pts[0] == 0
        assert np.allclose(clip.times, np.array(decoded.times[start:end]) - decoded.times[start], atol=1e-6)
        assert clip.rotation == decoded.rotation
        frames, times = opencv_frames(path)
        assert len(frames) == end - start
        assert all(np.array_equal(a, b) for a, b in zip(frames, opencv_source[start:end], strict=True))
        assert times[0] == 0
        trainer = decode_frames_at(path.read_bytes(), list(range(end - start)), threaded=True)
        with av.open(str(source)) as container:
            upright = [frame_rgb(f) for i, f in enumerate(container.decode(video=0)) if start <= i < end]
        assert len(trainer) == end - start
        assert all(np.array_equal(a, b) for a, b in zip(trainer, upright, strict=True))
        roll, key = rolls[path], max(k for k in decoded.keyframes if k <= start)
        # open GOPs (x264 open-gop, x265's default): the keyframe's leading B-frames (shown before it, decoded
        # after it, referring to the GOP before) are copied too; their decode fails harmlessly, they are never shown
        assert roll.pre_roll_frames == start - key + (SOURCES[name].leading_pictures if key > 0 else 0)
        assert (roll.pre_roll_bytes > 0) == (roll.pre_roll_frames > 0)
        assert (roll.post_roll_bytes > 0) == (roll.post_roll_frames > 0)
        assert path.stat().st_size > roll.pre_roll_bytes + roll.post_roll_bytes


@pytest.fixture(scope="module")
def sample_clips(sample_dir, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Two sample sources curated with the default method: cuts mid-GOP, hence pre- and post-rolls."""
    clips_dir = tmp_path_factory.mktemp("sample-clips")
    curated = {}
    for name in ["cuts_hard.mp4", "dissolves.mp4"]:
        path = sample_dir / "videos" / name
        result = process_source(path, name, clips_dir / name, CurationConfig())
        assert result.source_row["status"] == "ok", result.source_row["error"]
        curated[name] = (path, result.clip_rows)
    return curated


def test_sample_footage_is_cut_exactly_without_reencoding(sample_clips):
    """The default method on the sample set: every clip is an exact copy and decodes to exactly its source
    frames, through PyAV and OpenCV."""
    methods, rolled = [], 0
    for path, rows in sample_clips.values():
        source = decode_source(path)
        opencv_source, _ = opencv_frames(path)
        for row in rows:
            methods.append(row["clip_method"])
            rolled += row["pre_roll_frames"] + row["post_roll_frames"]
            start, end = row["start_frame"], row["end_frame"]
            clip = decode_source(Path(row["clip_path"]))
            assert len(clip.rgb) == end - start and clip.pts[0] == 0
            assert all(np.array_equal(a, b) for a, b in zip(clip.rgb, source.rgb[start:end], strict=True))
            frames, _ = opencv_frames(Path(row["clip_path"]))
            assert len(frames) == end - start
            assert all(np.array_equal(a, b) for a, b in zip(frames, opencv_source[start:end], strict=True))
    assert methods and set(methods) == {"exact-copy"}
    assert rolled > 0  # the cuts fall between keyframes: the edit lists hide frames


def test_the_trainers_sample_reader_reads_exactly_the_shot(curated_dir, sample_dir):
    """training/data.py's SampleReader on the curated sample shards (exact copies, edit lists and all): the frames
    it returns are the source's frames at the clip's start + the indices it drew, to the last bit (the phase is
    the clips' own size, so resizing is a copy)."""
    from dataformat import Column, find_shards, index_shards
    from training.data import SampleReader, sample_rng
    from training.stages import Phase, get_stage_preset

    samples = [s for s in index_shards(find_shards(str(curated_dir))) if s.is_video]
    rolled = [s for s in samples if s.meta()[Column.PRE_ROLL_FRAMES] or s.meta()[Column.POST_ROLL_FRAMES]]
    assert rolled, "some kept sample clip hides frames behind its edit list"
    reader = SampleReader(get_stage_preset(2, "tiny"))
    for position, sample in enumerate(rolled[:3]):
        meta = sample.meta()
        assert meta[Column.CLIP_METHOD] == "exact-copy"
        phase = Phase("check", meta[Column.HEIGHT], meta[Column.WIDTH], 4, 1, 1, 1e-4, 0.0, 1.0)
        pixels = reader.read(sample, phase, sample_rng(0, position))["pixels"]
        available = meta[Column.END_FRAME] - meta[Column.START_FRAME]
        indices, _ = reader.frame_indices(available, 4, sample_rng(0, position))
        wanted = [meta[Column.START_FRAME] + index for index in indices]
        source = np.stack(decode_frames_at(sample_dir / "videos" / meta[Column.SOURCE], wanted))
        read = pixels.add(1.0).mul(127.5).round().to(dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(read, source)


def test_edit_list_is_added_or_rewritten_and_read_back(tmp_path):
    """A file muxed without an edit list gets one; with one there, only its duration changes. Headers say the
    edit's length; a file that is not an MP4 is refused by name."""
    path = tmp_path / "plain.mp4"
    with av.open(str(path), mode="w", options={"use_editlist": "0"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"x264-params": "bframes=0:keyint=10"}
        for index in range(20):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(synthetic_frame(index), format="rgb24")))
        container.mux(stream.encode(None))
    assert read_video_track(path).edits == ()
    edit = set_presentation(path, Fraction(13, 25))  # 13 of 20 frames
    track = read_video_track(path)
    assert track.edits == (edit,) and edit == Edit(13 * track.movie_timescale // 25, 0)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 13
        assert abs(float(container.duration / av.time_base) - 0.52) < 0.01
    set_presentation(path, Fraction(7, 25))
    assert read_video_track(path).edits == (Edit(7 * track.movie_timescale // 25, 0),)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 7
    not_mp4 = tmp_path / "x.mp4"
    not_mp4.write_bytes(b"\x00\x00\x00\x10free" + bytes(8))
    with pytest.raises(MP4EditError, match="no moov box"):
        set_presentation(not_mp4, Fraction(1))


def test_exact_copy_plans_are_the_shots_and_reencode_only_what_cannot_be_copied():
    keyframes = [10, 35, 60, 85]
    config = ClipConfig(min_clip_s=0.8, max_clip_s=2.0)  # 20 to 50 frames
    plans = plan_clips([(0, 40), (40, 60), (60, 150)], keyframes, 150, 25.0, config)
    # frames before the first keyframe have nothing to copy from; a long shot is split at a keyframe where one
    # fits (the next piece needs no pre-roll), evenly otherwise
    assert plans == [ClipPlan(0, 40, "reencode", 0), ClipPlan(40, 60, "exact-copy", 1),
                     ClipPlan(60, 85, "exact-copy", 2), ClipPlan(85, 117, "exact-copy", 2),
                     ClipPlan(117, 150, "exact-copy", 2)]
    assert plan_clips([(0, 40)], keyframes, 150, 25.0, config, "keyframe") == [ClipPlan(10, 35, "keyframe", 0)]
    assert plan_clips([(0, 40)], keyframes, 150, 25.0, config, "reencode") == [ClipPlan(0, 40, "reencode", 0)]
    info = SourceInfo("x.mkv", 25.0, 96, 64, 2.0, "ffv1", 50)
    assert clip_method(info, CurationConfig()) == "reencode"  # MP4 cannot carry FFV1
    assert clip_method(SourceInfo("x.mp4", 25.0, 96, 64, 2.0, "h264", 50), CurationConfig(), [0, -1]) == "reencode"
    with pytest.raises(ValueError, match="clips.method must be one of exact-copy, keyframe, reencode"):
        CurationConfig.from_overrides({"clips": {"method": "copy"}})


def test_a_codec_mp4_cannot_carry_is_reencoded_exactly(tmp_path):
    """FFV1 in Matroska (lossless): no MP4 can carry it, so every clip is re-encoded, frame for frame."""
    source = tmp_path / "lossless.mkv"
    texture = synthetic_frame(0, 160, 64)
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for index in range(60):  # a slow pan: one shot
            frame = np.ascontiguousarray(texture[:, index : index + 96])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    result = process_source(source, "lossless.mkv", tmp_path / "clips", CurationConfig())
    assert result.source_row["status"] == "ok", result.source_row["error"]
    decoded = decode_source(source)
    assert result.clip_rows and all(row["clip_method"] == "reencode" for row in result.clip_rows)
    for row in result.clip_rows:
        clip = decode_source(Path(row["clip_path"]))
        assert len(clip.rgb) == row["end_frame"] - row["start_frame"] and row["pre_roll_frames"] == 0
        error = np.abs(clip.rgb[0].astype(int) - decoded.rgb[row["start_frame"]]).mean()
        assert error < 3  # x264 at crf 18, against the shot's own first frame


def test_decord_ignores_the_edit_list_and_the_manifest_says_how_to_read_it(sample_clips):
    """decord2 (not a dependency: skipped unless installed) decodes the shot's frames first but counts every
    copied packet and shifts timestamps by the pre-roll: read `end_frame - start_frame` frames from index 0
    and take timestamps from index `pre_roll_frames` on (docs/exact-clips.md)."""
    decord = pytest.importorskip("decord")
    path, rows = sample_clips["cuts_hard.mp4"]
    row = max(rows, key=lambda row: row["pre_roll_frames"])
    source = decode_source(path)
    start, end, pre_roll = row["start_frame"], row["end_frame"], row["pre_roll_frames"]
    reader = decord.VideoReader(row["clip_path"])
    assert pre_roll > 0
    assert len(reader) == end - start + pre_roll + row["post_roll_frames"]  # edit list ignored
    assert reader.get_frame_timestamp(0)[0] < 0 == reader.get_frame_timestamp(pre_roll)[0]
    frames = reader.get_batch(list(range(end - start))).asnumpy()
    assert all(np.array_equal(a, b) for a, b in zip(frames, source.rgb[start:end], strict=True))


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PAGE = """<video id=v muted preload=auto></video><canvas id=c></canvas><script>
window.result = new Promise((resolve) => {
  const video = document.getElementById('v');
  video.addEventListener('error', () => resolve({error: String(video.error && video.error.message)}));
  video.addEventListener('seeked', () => {
    const canvas = document.getElementById('c');
    canvas.width = video.videoWidth; canvas.height = video.videoHeight;
    const context = canvas.getContext('2d');
    context.drawImage(video, 0, 0);
    resolve({duration: video.duration, playable: video.canPlayType('video/mp4; codecs="avc1.64001e"'),
             pixels: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)});
  }, {once: true});
  video.addEventListener('loadeddata', () => { video.currentTime = 0; }, {once: true});
  video.src = 'clip.mp4';
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_chromium_plays_exactly_the_shot(generated, tmp_path):
    """A real browser applies the edit list: `video.duration` is the shot's length within one frame, and the
    picture it draws at time 0 is the shot's first frame, not the keyframe the copy starts from."""
    playwright = pytest.importorskip("playwright.sync_api")
    source = generated["h264_bframes_audio"]
    decoded = decode_source(source)
    start, end = 29, 43  # 5 frames of pre-roll, one of post-roll
    plan = ClipPlan(start, end, "exact-copy", 0)
    write_exact_clips(source, [(plan, tmp_path / "clip.mp4")], decoded.pts, decoded.keyframes)
    (tmp_path / "index.html").write_text(PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
                result = page.evaluate("window.result")
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "error" not in result, result
    assert result["playable"] == "probably"  # Debian's chromium plays H.264
    assert abs(result["duration"] - (end - start) / 25) <= 1 / 25
    drawn = np.array(result["pixels"], dtype=np.uint8).reshape(64, 96, 4)[..., :3].astype(int)
    distance = {index: float(np.abs(drawn - decoded.rgb[index]).mean()) for index in range(24, 31)}
    assert distance[start] < 3  # colour conversion only (no JPEG, no scaling)
    assert min(d for index, d in distance.items() if index != start) > 4 * distance[start] + 5, distance
