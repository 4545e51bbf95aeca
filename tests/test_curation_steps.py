"""Motion score, clip planning, stream copy and the per-source chain on real footage."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from curation.chain import process_source
from curation.clipping import ClipEncoder, ClipPlan, plan_clips, shots_from_cuts
from curation.config import ClipConfig, CurationConfig, FilterRule
from curation.cuts import CutCascade
from curation.filtering import apply_filters
from tests.curation_helpers import decode_rgb, psnr


@pytest.fixture(scope="module")
def processed(sample_dir, tmp_path_factory):
    clips_dir = tmp_path_factory.mktemp("clips")
    names = ["bikes.mp4", "cuts_hard.mp4", "static_shot.mp4", "bigbuckbunny.mp4"]
    return {n: process_source(sample_dir / "videos" / n, n, clips_dir / n, CurationConfig()) for n in names}


def test_static_shot_scores_far_below_moving_footage(processed):
    static = processed["static_shot.mp4"].clip_rows[0]["motion_score"]
    moving = [row["motion_score"] for row in processed["bikes.mp4"].clip_rows]
    assert static < 0.1, static
    assert min(moving) > 5 * static
    assert all(isinstance(v, float) for v in moving)


def test_keyframe_snapping_never_crosses_a_cut():
    keyframes = [0, 25, 50, 75, 100, 125]
    shots = shots_from_cuts([45, 77, 121], 150)
    plans = plan_clips(shots, keyframes, 150, 25.0, ClipConfig(min_clip_s=0.8, max_clip_s=30, method="keyframe"))
    for plan in plans:
        shot = shots[plan.shot_index]
        assert shot[0] <= plan.start_frame < plan.end_frame <= shot[1]
        if plan.method == "keyframe":
            assert plan.start_frame in keyframes
            assert plan.end_frame in keyframes or plan.end_frame == 150
    # shot [77, 121) holds only keyframe 100: too little to copy, so it is re-encoded exactly.
    assert ClipPlan(77, 121, "reencode", 2) in plans
    assert ClipPlan(0, 25, "keyframe", 0) in plans


def test_long_shots_split_at_keyframes_within_max_length():
    keyframes = list(range(0, 1000, 25))
    plans = plan_clips([(0, 1000)], keyframes, 1000, 25.0, ClipConfig(min_clip_s=1, max_clip_s=10, method="keyframe"))
    assert [p.end_frame - p.start_frame for p in plans] == [250, 250, 250, 250]
    assert all(p.start_frame in keyframes for p in plans)


def test_copied_clip_is_the_exact_source_frames(processed, sample_dir):
    source = decode_rgb(sample_dir / "videos" / "bikes.mp4")
    for row in processed["bikes.mp4"].clip_rows:
        assert row["clip_method"] == "exact-copy"
        clip = decode_rgb(Path(row["clip_path"]))
        assert len(clip) == row["end_frame"] - row["start_frame"]
        assert psnr(clip[0], source[row["start_frame"]]) > 60  # bit-exact: no re-encode
        assert psnr(clip[-1], source[row["end_frame"] - 1]) > 60


def test_reencode_fallback_is_recorded_and_frame_exact(sample_dir, tmp_path):
    """clips.method keyframe: a shot with too few keyframes inside it is re-encoded instead."""
    config = CurationConfig.from_overrides({"clips": {"method": "keyframe"}})
    rows = process_source(sample_dir / "videos" / "cuts_hard.mp4", "cuts_hard.mp4", tmp_path, config).clip_rows
    reencoded = [r for r in rows if r["clip_method"] == "reencode"]
    assert reencoded, "the sparse-keyframe shot should fall back to re-encoding"
    source = decode_rgb(sample_dir / "videos" / "cuts_hard.mp4")
    for row in reencoded:
        clip = decode_rgb(Path(row["clip_path"]))
        assert len(clip) == row["end_frame"] - row["start_frame"]
        assert psnr(clip[0], source[row["start_frame"]]) > 30
    with av.open(rows[0]["clip_path"]) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_clip_frames_are_first_middle_last_samples(processed):
    result = processed["bikes.mp4"]
    assert len(result.clip_frames) == len(result.clip_rows)
    for frames in result.clip_frames:
        assert frames.frames.shape[0] == 3 and frames.frames.dtype.name == "uint8"
        assert max(frames.frames.shape[1:3]) <= 640


def test_percentile_rule_drops_exact_share_and_absolute_rule_threshold():
    rows = [{"clip_id": f"c{i}", "motion_score": float(i), "text_area": i / 100} for i in range(8)]
    summary = apply_filters(rows, [
        FilterRule("static", "motion_score", "percentile", "low", 25.0),
        FilterRule("text", "text_area", "absolute", "high", 0.05),
        FilterRule("aesthetics", "aesthetic_score", "percentile", "low", 25.0),
    ])
    dropped_static = {r["clip_id"] for r in rows if "static" in r["drop_reasons"]}
    assert dropped_static == {"c0", "c1"}
    assert {r["clip_id"] for r in rows if "text" in r["drop_reasons"]} == {"c6", "c7"}
    assert summary.outcomes[2].skipped and summary.outcomes[2].dropped == 0
    assert summary.kept == 4 and [r["keep"] for r in rows] == [False, False, True, True, True, True, False, False]


def test_config_overrides_are_checked_by_name():
    config = CurationConfig.from_overrides({"clips": {"min_clip_s": 2}, "motion": {"fps": 4.0}})
    assert config.clips.min_clip_s == 2.0 and config.motion.fps == 4.0
    with pytest.raises(ValueError, match="unknown setting config.clips.min_clip"):
        CurationConfig.from_overrides({"clips": {"min_clip": 2}})
    with pytest.raises(ValueError, match="must be float"):
        CurationConfig.from_overrides({"cuts": {"mid_fps": "fast"}})
    with pytest.raises(ValueError, match="percentile must be in"):
        CurationConfig.from_overrides({"filters": [{"name": "x", "column": "motion_score", "mode": "percentile",
                                                     "drop": "low", "value": 250}]})


@pytest.mark.parametrize(("lookahead_mb", "late_cuts"), [(512, False), (0, False), (512, True)],
                         ids=["while-decoding", "second-pass", "cuts-settled-late"])
def test_every_reencoded_clip_of_a_source_is_frame_exact_from_one_decode_pass(sample_dir, tmp_path, monkeypatch,
                                                                              lookahead_mb, late_cuts):
    """clips.method reencode: bikes.mp4's shots are all re-encoded, each clip exactly its source frames with its own
    timestamps; written from the chain's own decode (or, when the frames held back would not fit in
    clips.lookahead_mb or the cascade settled the cuts only at the end, from one more pass for them all)."""
    if late_cuts:  # the live pass then sees one shot, which matches none of the planned clips
        monkeypatch.setattr(CutCascade, "is_cut_so_far", lambda self, index: False)
    opened = []
    real_open = av.open

    def counting_open(file, *args, **kwargs):
        if not kwargs.get("mode") and not (args and args[0] == "w"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    config = CurationConfig.from_overrides({"clips": {"method": "reencode", "lookahead_mb": lookahead_mb}})
    source = sample_dir / "videos" / "bikes.mp4"
    result = process_source(source, "bikes.mp4", tmp_path / "clips", config)
    rows = result.clip_rows
    assert len(rows) >= 4 and all(row["clip_method"] == "reencode" for row in rows)
    # one open for the header checks and the chain's decode (+ one pass for all re-encoded clips when they are
    # not written live)
    assert opened.count(str(source)) == (1 if lookahead_mb and not late_cuts else 2)
    if not lookahead_mb:
        assert result.second_pass_clips == len(rows)
    elif late_cuts:  # shots among the frames still held back at the end match: their cuts were final by then
        assert 0 < result.second_pass_clips < len(rows)
    else:
        assert result.second_pass_clips == 0
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == sorted(Path(r["clip_path"]).name for r in rows)
    frames = decode_rgb(source)
    for row in rows:
        clip = decode_rgb(Path(row["clip_path"]))
        assert len(clip) == row["end_frame"] - row["start_frame"]
        for offset in (0, len(clip) // 2, len(clip) - 1):
            assert psnr(clip[offset], frames[row["start_frame"] + offset]) > 30
    with real_open(rows[-1]["clip_path"]) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times == pytest.approx([i / rows[-1]["fps"] for i in range(len(times))], abs=1e-3)
    with pytest.raises(ValueError, match=r"clips\.reencode_preset must be one of ultrafast"):
        CurationConfig.from_overrides({"clips": {"reencode_preset": "quick"}})


@pytest.mark.parametrize("preset", ["ultrafast", "medium"])  # medium: B-frames and frame threads
def test_one_encoder_writes_each_clip_as_its_own_complete_file(sample_dir, tmp_path, preset):
    """ClipEncoder: clips of one shared x264 encoder, each file exactly its frames, starting on a keyframe
    with 1-s GOPs; an abandoned clip leaves no file; a rotated source's matrix is kept."""
    source = sample_dir / "videos" / "bikes.mp4"
    with av.open(str(source)) as container:
        frames = list(container.decode(video=0))
    rotated = tmp_path / "source" / "portrait.mp4"  # frames 60-136 as a phone stores them (a display matrix)
    rotated.parent.mkdir()
    with av.open(str(rotated), "w") as writer:
        stream = writer.add_stream("libx264", rate=25, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.set_display_rotation(-90)
        for frame in frames[60:137]:
            writer.mux(stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
                                     .reformat(format="yuv420p")))
        writer.mux(stream.encode(None))
    with av.open(str(rotated)) as container:
        frames[60:137] = list(container.decode(video=0))
    encoder = ClipEncoder(frames[0].width, frames[0].height, 25.0, 18, preset, threads=2)
    spans = {"a": (0, 30), "dropped": (30, 45), "b": (60, 137), "c": (200, 226)}
    for name, (start, end) in spans.items():
        encoder.begin(tmp_path / f"{name}.mp4")
        for frame in frames[start:end]:
            encoder.add(frame)
        if name == "dropped":
            encoder.abandon()
    written = encoder.close()
    assert written == {tmp_path / f"{n}.mp4": end - start for n, (start, end) in spans.items() if n != "dropped"}
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["a.mp4", "b.mp4", "c.mp4"]
    source_rgb = decode_rgb(source)
    for name in ("a", "b", "c"):
        start, end = spans[name]
        with av.open(str(tmp_path / f"{name}.mp4")) as container:
            decoded = list(container.decode(video=0))
        assert [i for i, f in enumerate(decoded) if f.key_frame] == list(range(0, end - start, 25))
        assert {f.rotation for f in decoded} == ({-90} if name == "b" else {0})
        clip = decode_rgb(tmp_path / f"{name}.mp4")
        assert len(clip) == end - start
        for offset in (0, len(clip) // 2, len(clip) - 1):
            assert psnr(clip[offset], source_rgb[start + offset]) > 30


def test_an_encoder_thread_error_reaches_the_caller(sample_dir, tmp_path):
    with av.open(str(sample_dir / "videos" / "bikes.mp4")) as container:
        frames = [frame for _, frame in zip(range(5), container.decode(video=0), strict=False)]
    (tmp_path / "a-file").write_text("not a directory")
    encoder = ClipEncoder(frames[0].width, frames[0].height, 25.0, 18, "ultrafast")
    encoder.begin(tmp_path / "a-file" / "clip.mp4")
    for frame in frames:
        encoder.add(frame)
    with pytest.raises(FileExistsError):  # raised on the encoder thread, handed over by close()
        encoder.close()
    encoder.discard()


def test_no_frame_is_encoded_for_a_shot_that_is_copied_or_too_short(sample_dir, tmp_path, monkeypatch):
    """The live re-encoder looks at the keyframes and cuts the decoder already knows (it runs `settle_frames`
    ahead): every frame it encodes ends up in a re-encoded clip, none is left to a second pass, and a shot
    copied up to the source's end is dropped as soon as the decoder reaches that end."""
    encoded = []
    real_add = ClipEncoder.add
    monkeypatch.setattr(ClipEncoder, "add", lambda self, frame: (encoded.append(1), real_add(self, frame)))
    needed = 0
    config = CurationConfig.from_overrides({"clips": {"method": "keyframe"}})
    for name in ["bikes.mp4", "cuts_hard.mp4", "dissolves.mp4", "fade_black.mp4"]:
        result = process_source(sample_dir / "videos" / name, name, tmp_path / name, config)
        assert result.source_row["status"] == "ok" and result.second_pass_clips == 0
        needed += sum(r["end_frame"] - r["start_frame"] for r in result.clip_rows if r["clip_method"] == "reencode")
    assert needed > 0 and len(encoded) == needed
    encoded.clear()  # one 132-frame shot, copied from its only keyframe to the end
    result = process_source(sample_dir / "videos" / "bigbuckbunny.mp4", "b.mp4", tmp_path / "b", config)
    assert [r["clip_method"] for r in result.clip_rows] == ["keyframe"]
    settle = CutCascade(CurationConfig().cuts, result.source_row["fps"]).settle_frames
    assert 0 < len(encoded) <= result.source_row["num_frames"] - settle + 1


def test_a_ray_task_decodes_and_encodes_on_the_cpus_it_was_given(ray_local):
    """decode.threads = 0: a task granted 1 CPU uses 1 thread (FFmpeg would start one per core of the node and
    crowd the other tasks there); outside Ray, every core this process may use; a set value wins."""
    import os

    from curation.decode import thread_budget

    budget = ray_local.remote(thread_budget)
    assert ray_local.get(budget.options(num_cpus=1).remote()) == 1
    assert ray_local.get(budget.options(num_cpus=2).remote()) == 2
    assert ray_local.get(budget.options(num_cpus=1).remote(3)) == 3
    assert thread_budget() == len(os.sched_getaffinity(0))
