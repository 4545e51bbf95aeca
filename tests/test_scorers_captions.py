"""The video captioner (GIT over spread frames) and the LLM summary of the CoCa and video captions, through
their real loading code (tiny random models the tests save to disk), on real footage: frames kept by the
decode stage, batching, per-clip errors, the `captions` struct, the Ray pools, and the trainer's caption mix."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from common.requests import merge
from curation.actors import AnnotateReport, annotate
from curation.config import CurationConfig
from curation.scorers.base import MissingWeightsError
from curation.scorers.config import LlmSummaryConfig, ScorersConfig, VideoCaptionConfig
from curation.scorers.llm_summary import LlmCaptionSummarizer
from curation.scorers.video_captions import GitVideoCaptioner
from curation.types import ClipFrames
from tests.caption_models import caption_models, video_clips
from tests.scorer_helpers import tiny_models, tiny_scorer_overrides


@pytest.fixture(scope="module")
def models() -> dict[str, str]:
    return caption_models()


@pytest.fixture(scope="module")
def video_captioner(models) -> GitVideoCaptioner:
    return GitVideoCaptioner(VideoCaptionConfig(model_path=models["git_video"], max_new_tokens=8), "cpu")


@pytest.fixture(scope="module")
def summariser(models) -> LlmCaptionSummarizer:
    return LlmCaptionSummarizer(LlmSummaryConfig(model_path=models["llm_chat"], max_new_tokens=12), "cpu")


def caption_overrides(models: dict[str, str]) -> dict:
    """`config.scorers` overrides with all three captioners on (tiny CoCa, GIT and Llama)."""
    scorers = tiny_scorer_overrides(tiny_models())
    return {
        "caption": scorers["caption"],
        "video_caption": {"model_path": models["git_video"], "max_new_tokens": 8},
        "llm_summary": {"model_path": models["llm_chat"], "max_new_tokens": 12},
        "text": {"enabled": False},
    }


def test_video_captions_depend_on_the_frames_batch_and_reload_identically(models, video_captioner):
    clips = video_clips(5)
    rows = video_captioner.score(clips)
    for row in rows:
        assert set(row) == {"captions"}
        assert row["captions"]["coca"] is None and row["captions"]["llm_summary"] is None
        assert isinstance(row["captions"]["video"], str) and row["captions"]["video"]
    assert len({row["captions"]["video"] for row in rows}) >= 2  # different footage, different captions
    assert [video_captioner.score([clip])[0] for clip in clips] == rows  # batched = one at a time
    again = GitVideoCaptioner(VideoCaptionConfig(model_path=models["git_video"], max_new_tokens=8), "cpu")
    assert again.score(clips) == rows
    assert video_captioner.describe()["frames"] == 6


def test_video_captioner_uses_every_frame(video_captioner):
    """The caption reads all six frames (temporal embeddings), not just one of them."""
    clips = video_clips(4)
    shuffled = [ClipFrames(c.clip_id, c.frames, video_frames=c.video_frames[::-1].copy()) for c in clips]
    forward = [row["captions"]["video"] for row in video_captioner.score(clips)]
    backward = [row["captions"]["video"] for row in video_captioner.score(shuffled)]
    assert forward != backward


def test_video_captioner_resamples_frames_and_isolates_bad_clips(video_captioner):
    clips = video_clips(3, frames=4)  # fewer frames than the model's 6: repeated evenly
    clips[1] = video_clips(1, frames=10, start=60)[0]  # more: thinned evenly
    missing = ClipFrames("no-video", clips[0].frames)  # decoded while the captioner was off
    broken = ClipFrames("tiny", clips[0].frames, video_frames=np.zeros((6, 4, 4, 3), np.uint8))
    rows = video_captioner.score([clips[0], missing, clips[1], broken, clips[2]])
    assert all(rows[i]["captions"]["video"] for i in (0, 2, 4))
    assert rows[1]["captions"] is None and "no video frames were kept" in rows[1]["error"]
    assert rows[3]["captions"] is None and rows[3]["error"].startswith("video_caption: video frames:")
    assert rows[0] == video_captioner.score([clips[0]])[0]


def test_llm_summary_prompt_batching_and_missing_captions(models, summariser):
    prompt = summariser.prompt("a man rides a bike", "people walking on a road")
    assert prompt.startswith("<s> user : ") and prompt.endswith("assistant : ")  # the tokenizer's chat template
    assert '"a man rides a bike"' in prompt and '"people walking on a road"' in prompt
    pairs = [("a man rides a bike", "people walking on a road"), ("a car at night", "cars on a street"),
             ("two riders", "a bike on a road near the city")]
    summaries = summariser.summarise(pairs)
    assert all(summaries) and len(set(summaries)) >= 2  # the answer depends on the captions
    assert [summariser.summarise([pair])[0] for pair in pairs] == summaries  # left padding: batch = single
    clips = [ClipFrames(f"c{i}", np.zeros((3, 32, 32, 3), np.uint8),
                        extra={"captions": {"coca": coca, "video": video, "llm_summary": None}})
             for i, (coca, video) in enumerate(pairs)]
    clips.insert(1, ClipFrames("half", clips[0].frames, extra={"captions": {"coca": "a bike", "video": None}}))
    rows = summariser.score(clips)
    assert [row["captions"]["llm_summary"] for i, row in enumerate(rows) if i != 1] == summaries
    assert rows[1]["captions"] is None and rows[1]["error"] == (
        "llm_summary: needs both the CoCa and the video caption; missing: video")
    plain = LlmCaptionSummarizer(LlmSummaryConfig(model_path=models["llm_plain"], max_new_tokens=12), "cpu")
    assert plain.prompt("a", "b") == LlmSummaryConfig().prompt.replace("{coca}", "a").replace("{video}", "b") + "\n"
    assert plain.summarise(pairs) == [plain.summarise([pair])[0] for pair in pairs]


def test_bad_weights_paths_name_the_setting(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 16)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["git_video"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    video_setting, llm_setting = r"scorers\.video_caption\.model_path", r"scorers\.llm_summary\.model_path"
    for path in (None, str(tmp_path / "missing"), str(a_file), str(empty)):
        with pytest.raises(MissingWeightsError, match=video_setting):
            GitVideoCaptioner(VideoCaptionConfig(model_path=path), "cpu")
        with pytest.raises(MissingWeightsError, match=llm_setting):
            LlmCaptionSummarizer(LlmSummaryConfig(model_path=path), "cpu")
    for path in (corrupt, unknown):
        with pytest.raises(ValueError, match=video_setting + ".*cannot be loaded by transformers"):
            GitVideoCaptioner(VideoCaptionConfig(model_path=str(path)), "cpu")
    with pytest.raises(ValueError, match=video_setting + r".*'llama' model; expected a GIT video captioner"):
        GitVideoCaptioner(VideoCaptionConfig(model_path=models["llm_chat"]), "cpu")
    with pytest.raises(ValueError, match=video_setting + ".*image GIT"):
        GitVideoCaptioner(VideoCaptionConfig(model_path=models["git_image"]), "cpu")
    with pytest.raises(ValueError, match=llm_setting + ".*not a language model"):
        LlmCaptionSummarizer(LlmSummaryConfig(model_path=models["git_video"]), "cpu")
    with pytest.raises(ValueError, match=r"scorers\.llm_summary\.prompt"):
        CurationConfig.from_overrides({"scorers": {"llm_summary": {"prompt": "Summarise {coca}."}}})


def test_captioners_are_off_with_the_setting_to_fill():
    unavailable = ScorersConfig().unavailable()
    assert "scorers.video_caption.model_path" in unavailable["video_caption"]
    assert "scorers.llm_summary.model_path" in unavailable["llm_summary"]
    only_llm = CurationConfig.from_overrides({"scorers": {"llm_summary": {"model_path": "/models/llm"}}}).scorers
    assert only_llm.unavailable()["llm_summary"] == (
        "off: it summarises the CoCa and the video caption; switch on scorers.caption and scorers.video_caption")
    assert only_llm.active() == ["text"] and only_llm.spooled_video_frames() == 0
    with pytest.raises(ValueError, match="needs the caption and video_caption scorers"):
        annotate([], ScorersConfig(use_ray=False), names=["llm_summary"])


def _annotated(config: ScorersConfig, clips: list[ClipFrames], report: AnnotateReport | None = None):
    return annotate(clips, config, report=report)


def test_three_captions_in_process_and_on_ray_pools(models, ray_local):
    config = CurationConfig.from_overrides({"scorers": caption_overrides(models)}).scorers
    assert config.active() == ["caption", "video_caption", "llm_summary"]
    clips = [*video_clips(4), ClipFrames("broken", np.zeros((3, 4, 4, 3), np.uint8),
                                         video_frames=np.zeros((6, 4, 4, 3), np.uint8))]
    config = dataclasses.replace(config, use_ray=False)
    local = _annotated(config, clips)
    for clip in clips[:4]:
        captions = local[clip.clip_id]["captions"]
        assert captions["coca"] == local[clip.clip_id]["caption"] and captions["video"] and captions["llm_summary"]
        assert "scorer_errors" not in local[clip.clip_id]
    summariser = LlmCaptionSummarizer(LlmSummaryConfig(model_path=models["llm_chat"], max_new_tokens=12), "cpu")
    pairs = [(local[c.clip_id]["captions"]["coca"], local[c.clip_id]["captions"]["video"]) for c in clips[:4]]
    assert summariser.summarise(pairs) == [local[c.clip_id]["captions"]["llm_summary"] for c in clips[:4]]
    broken = local["broken"]
    assert broken["captions"] is None and len(broken["scorer_errors"]) == 3
    assert any(e.startswith("llm_summary: needs both") for e in broken["scorer_errors"])

    config = merge(config, {"use_ray": True, **{name: {"pool": {"batch_size": 2}}
                                                for name in ("caption", "video_caption", "llm_summary")}})
    report = AnnotateReport()
    remote = _annotated(config, clips, report)
    assert {cid: row["captions"] for cid, row in remote.items()} == {cid: row["captions"] for cid, row in local.items()}
    assert set(report.pools) == {"caption", "video_caption", "llm_summary"}
    assert all(stats.clips == len(clips) and stats.actors == 1 for stats in report.pools.values())


def test_decode_keeps_spread_frames_and_the_run_gets_three_captions(models, sample_dir, tmp_path):
    """Sample footage through decode -> frames on disk -> annotations -> manifest -> the trainer's mix."""
    import pyarrow.parquet as pq

    from curation.annotations import annotate_sources, read_annotations
    from curation.chain import process_source
    from curation.dataset import RunLayout, curate_source, finalize, prepare_output, video_frames_path
    from dataformat import training_caption
    from training.stages import get_stage_preset

    videos = sample_dir / "videos"
    config = CurationConfig.from_overrides({"scorers": {**caption_overrides(models), "use_ray": False}})
    result = process_source(videos / "bikes.mp4", "bikes.mp4", tmp_path / "scratch", config)
    assert len(result.clip_frames) >= 3
    for clip, row in zip(result.clip_frames, result.clip_rows, strict=True):
        assert clip.video_frames.shape == (6, *clip.frames.shape[1:])
        assert len({frame.tobytes() for frame in clip.video_frames}) >= 3  # spread over the shot, not one frame
        assert row["end_frame"] - row["start_frame"] >= 25
    off = process_source(videos / "bikes.mp4", "bikes.mp4", tmp_path / "scratch-off", CurationConfig())
    assert all(clip.video_frames is None for clip in off.clip_frames)

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("bikes.mp4", "dissolves.mp4"):
        shutil.copy(videos / name, inputs / name)
    layout = prepare_output(out, config)
    rows = [curate_source(inputs, name, out, config) for name in ("bikes.mp4", "dissolves.mp4")]
    assert all(row["status"] == "ok" for row in rows)
    assert all(video_frames_path(p).exists() for p in (out / "work" / "frames").rglob("*.jpg")
               if not p.name.endswith(".video.jpg"))
    report = annotate_sources(out, config, expect_sources=False)
    assert report.clips >= 5 and set(report.unavailable) == {"clip"}  # only CLIP has no weights here
    annotations = read_annotations(out)
    finalize(RunLayout(out), config, annotations)
    manifest = pq.read_table(layout.out / "manifest.parquet").to_pylist()
    assert {row["clip_id"] for row in manifest} == set(annotations)
    for row in manifest:
        assert row["captions"]["coca"] == row["caption"] and row["captions"]["video"] and row["captions"]["llm_summary"]

    mix = get_stage_preset(1).caption_mix
    rng = np.random.default_rng(0)
    meta = manifest[0]
    source_of = {meta["captions"][name]: name for name in ("coca", "video", "llm_summary")}
    assert len(source_of) == 3  # three different texts, so each draw names its captioner
    draws = [source_of[training_caption(meta, None, rng, mix)] for _ in range(6000)]  # what training/data.py calls
    shares = {name: draws.count(name) / len(draws) for name in ("coca", "video", "llm_summary")}
    assert shares["coca"] == pytest.approx(0.5, abs=0.03)
    assert shares["video"] == pytest.approx(0.25, abs=0.03) and shares["llm_summary"] == pytest.approx(0.25, abs=0.03)
