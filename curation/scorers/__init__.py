"""Learned curation scorers (docs/recipe.md §1): text area, CLIP aesthetics + text score, the three captioners
(CoCa on the middle frame, a GIT video captioner, an LLM summary of both), RAFT motion.

Each scorer follows the `ClipScorer` protocol of curation/types.py and loads its model once; actors in
curation/actors.py hold one each. The table below is the one place that names them: each entry is a `ScorerSpec`
(curation/scorers/graph.py) saying where its class is, its settings, the columns it writes and whose output it
reads; activation, the "off" report, validation and the order `annotate` schedules pools in derive from it.
"""

from __future__ import annotations

from typing import Any

from curation.scorers.config import (
    CaptionConfig,
    ClipScoreConfig,
    LlmSummaryConfig,
    RaftConfig,
    ScorersConfig,
    TextAreaConfig,
    VideoCaptionConfig,
)
from curation.scorers.graph import SCORERS, ScorerSpec, register, settings_of, spec_of
from curation.scorers.graph import build_scorer as build_from_spec
from curation.types import ClipFrames
from dataformat.schema import Column


def has_own_caption(clip: ClipFrames) -> bool:
    """A clip with its source's caption needs no CoCa caption for its CLIP text score."""
    return bool(clip.caption)


for _spec in (
    ScorerSpec("text", "curation.scorers.text_area:TextAreaScorer", TextAreaConfig, (Column.TEXT_AREA,),
               error_prefix="text_area", can_use_gpu=TextAreaConfig.can_use_gpu),
    ScorerSpec("caption", "curation.scorers.captions:CocaCaptioner", CaptionConfig,
               (Column.CAPTION, Column.CAPTIONS), shows="caption"),
    ScorerSpec("video_caption", "curation.scorers.video_captions:GitVideoCaptioner", VideoCaptionConfig,
               (Column.CAPTIONS,), shows="captions.video"),
    ScorerSpec("llm_summary", "curation.scorers.llm_summary:LlmCaptionSummarizer", LlmSummaryConfig,
               (Column.CAPTIONS,), needs=("caption", "video_caption"),
               reads="summarises the CoCa and the video caption", shows="captions.llm_summary"),
    ScorerSpec("clip", "curation.scorers.clip_scores:ClipScorer", ClipScoreConfig,
               (Column.AESTHETIC_SCORE, Column.CLIP_SCORE, Column.CLIP_EMBEDDING), uses=("caption",),
               reads="scores the frames against the CoCa caption", ready_without_uses=has_own_caption,
               shows="aesthetic_score / clip_score"),
    ScorerSpec("raft", "curation.scorers.raft_motion:RaftMotionScorer", RaftConfig, (Column.RAFT_MOTION,),
               per_clip=False, error_prefix="raft_motion"),
):
    register(_spec)

SCORER_NAMES = tuple(SCORERS)


def build_scorer(name: str, config: ScorersConfig, device: str = "auto", threads: int = 1) -> Any:
    """Instantiate (and load the model of) the scorer called `name` from its part of `config`."""
    return build_from_spec(spec_of(name), settings_of(config, name), device, threads)


def pool_config(name: str, config: ScorersConfig):
    """The ActorPoolConfig of scorer `name`."""
    return settings_of(config, name).pool
