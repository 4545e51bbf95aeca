"""The scorer graph (curation/scorers/graph.py): a new scorer is one class plus one `register` entry, and
activation, the "off" report and `annotate`'s scheduling follow from the table alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from common.requests import RequestError, Settings, build, setting
from curation.actors import AnnotateReport, annotate
from curation.config import CurationConfig
from curation.scorers import SCORER_NAMES
from curation.scorers.base import score_isolated, scorer_device
from curation.scorers.config import ActorPoolConfig, ScorersConfig
from curation.scorers.graph import SCORERS, ScorerSpec, register, schedule, unregister
from curation.types import ClipFrames
from dataformat.schema import Column
from tests.scorer_helpers import real_clips, text_clip


@dataclass(frozen=True)
class BrightnessSettings(Settings):
    """Settings of the test's scorer: a gamma on the mean brightness."""

    enabled: bool = setting(True, help="score brightness")
    gamma: float = setting(1.0, min=0.1, max=10.0, help="brightness ** gamma")
    pool: ActorPoolConfig = setting(default_factory=ActorPoolConfig, help="its actor pool")


SCORED_AFTER: list[tuple[str, Any]] = []  # (clip_id, the text area it was handed) in the order it ran


class TextFreeBrightness:
    """Mean brightness of the frames in [0, 1] (to the power gamma), times the share of the frame without text:
    a real scorer of frames that reads the text scorer's output."""

    name = "brightness"
    columns = ("text_free_brightness",)

    def __init__(self, settings: BrightnessSettings, device: str, threads: int) -> None:
        scorer_device(settings, device, threads)
        self.gamma = settings.gamma

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu"}

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, self.name, self._score_valid)

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        rows = []
        for clip in batch:
            area = clip.extra[Column.TEXT_AREA]
            SCORED_AFTER.append((clip.clip_id, area))
            brightness = float(clip.frames.astype(np.float64).mean() / 255.0) ** self.gamma
            rows.append({"text_free_brightness": None if area is None else brightness * (1.0 - area)})
        return rows


@pytest.fixture
def brightness_scorer():
    """The one table entry a new scorer takes."""
    spec = register(ScorerSpec("brightness", f"{__name__}:TextFreeBrightness", BrightnessSettings,
                               ("text_free_brightness",), needs=("text",), reads="weighs brightness by the text area"))
    SCORED_AFTER.clear()
    yield spec
    unregister("brightness")


def test_a_registered_scorer_runs_after_its_need_with_its_output(brightness_scorer):
    config = ScorersConfig(use_ray=False)  # no weights configured: text (bundled PP-OCR) and the test scorer
    assert config.active() == ["text", "brightness"]
    clips = real_clips(3)
    big_text, _ = text_clip("big-text", [("BREAKING NEWS", 2.4, 5, (30, 120)), ("LIVE 24/7", 2.4, 5, (30, 300))])
    clips.append(big_text)
    report = AnnotateReport()
    rows = annotate(clips, config, report=report)
    assert set(report.pools) == {"text", "brightness"}
    assert "brightness" not in report.unavailable
    handed = dict(SCORED_AFTER)
    assert sorted(handed) == sorted(c.clip_id for c in clips)  # each clip scored once, after its text area
    assert rows["big-text"]["text_area"] > 0.07
    for clip in clips:
        row = rows[clip.clip_id]
        assert handed[clip.clip_id] == row["text_area"]
        expected = float(clip.frames.astype(np.float64).mean() / 255.0) * (1.0 - row["text_area"])
        assert row["text_free_brightness"] == pytest.approx(expected, rel=1e-9)
    assert rows["big-text"]["text_free_brightness"] < float(big_text.frames.mean() / 255.0)


def test_a_scorer_whose_need_is_off_is_reported_off(brightness_scorer):
    config = CurationConfig.from_overrides({"scorers": {"text": {"enabled": False}}}).scorers
    assert config.active() == []
    assert config.unavailable()["brightness"] == "off: it weighs brightness by the text area; switch on scorers.text"
    with pytest.raises(ValueError, match="^the brightness scorer weighs brightness by the text area: it needs the "
                                         "text scorers in the same call$"):
        annotate([], config, names=["brightness"])


def test_unknown_need_cycle_and_duplicate_are_one_line_errors(brightness_scorer):
    with pytest.raises(RequestError, match=r"^scorer 'glow' needs 'sparkle', which no scorer registers; known: "):
        register(ScorerSpec("glow", f"{__name__}:TextFreeBrightness", BrightnessSettings, (), needs=("sparkle",)))
    with pytest.raises(RequestError, match="^scorer 'brightness' is already registered$"):
        register(brightness_scorer)
    register(ScorerSpec("glow", f"{__name__}:TextFreeBrightness", BrightnessSettings, (), needs=("brightness",)))
    try:
        with pytest.raises(RequestError, match=r"^scorer 'brightness' closes a cycle in the scorer graph: "
                                               r"brightness -> glow -> brightness$"):
            register(ScorerSpec("brightness", f"{__name__}:TextFreeBrightness", BrightnessSettings, (),
                                needs=("glow",)), replace=True)
        assert SCORERS["brightness"] is brightness_scorer  # a rejected entry changes nothing
        assert schedule(["glow", "brightness", "text"]) == ["text", "brightness", "glow"]
    finally:
        unregister("glow")


def test_bad_settings_are_one_line_errors(brightness_scorer):
    with pytest.raises(RequestError, match=r"^gamma must be >= 0.1, got 0.0$"):
        BrightnessSettings(gamma=0.0)
    with pytest.raises(RequestError, match=r"^setting scorers.caption.num_beams must be >= 1, got 0$"):
        CurationConfig.from_overrides({"scorers": {"caption": {"num_beams": 0}}})


def test_the_table_reproduces_the_hand_wired_activation():
    """What annotate and ScorersConfig used to hard-code by name."""
    assert SCORER_NAMES == ("text", "caption", "video_caption", "llm_summary", "clip", "raft")
    assert SCORERS["llm_summary"].needs == ("caption", "video_caption")  # the summary reads both captions
    assert SCORERS["clip"].uses == ("caption",) and not SCORERS["clip"].needs  # CLIP waits for CoCa when it runs
    assert not SCORERS["raft"].per_clip  # RAFT runs in the hq pass
    weights = {"clip": {"pretrained": "w"}, "caption": {"pretrained": "w"}, "video_caption": {"model_path": "m"},
               "llm_summary": {"model_path": "m"}, "raft": {"weights": "r"}}

    def scorers(**overrides: Any) -> ScorersConfig:
        return build(ScorersConfig, overrides)

    everything = scorers(**weights)
    assert everything.active() == ["text", "caption", "video_caption", "llm_summary", "clip"]
    assert everything.unavailable() == {}
    assert schedule(["clip", "llm_summary", "video_caption", "caption"]) == [
        "caption", "video_caption", "llm_summary", "clip"]
    no_video = scorers(**{**weights, "video_caption": {"enabled": False}})
    assert no_video.active() == ["text", "caption", "clip"]
    assert no_video.unavailable() == {"llm_summary": "off: it summarises the CoCa and the video caption; switch on "
                                                     "scorers.video_caption"}
    no_caption_weights = scorers(**{**weights, "caption": {"pretrained": None}})
    assert no_caption_weights.active() == ["text", "video_caption", "clip"]  # CLIP runs without CoCa
    assert set(no_caption_weights.unavailable()) == {"caption", "llm_summary"}
    assert ScorersConfig().active() == ["text"]
    assert set(ScorersConfig().unavailable()) == {"clip", "caption", "video_caption", "llm_summary", "raft"}
