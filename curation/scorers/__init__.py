"""Learned curation scorers (docs/recipe.md §1): text area, CLIP aesthetics + text score, the three captioners
(CoCa on the middle frame, a GIT video captioner, an LLM summary of both), RAFT motion.

Each scorer follows the `ClipScorer` protocol of curation/types.py and loads its model once; actors in
curation/actors.py hold one each. `build_scorer` is the single place that maps a name to its class.
"""

from __future__ import annotations

from typing import Any

from curation.scorers.config import ScorersConfig

SCORER_NAMES = ("text", "caption", "video_caption", "llm_summary", "clip", "raft")


def build_scorer(name: str, config: ScorersConfig, device: str = "auto", threads: int = 1) -> Any:
    """Instantiate (and load the model of) the scorer called `name` from its part of `config`."""
    if name == "text":
        from curation.scorers.text_area import TextAreaScorer

        return TextAreaScorer(config.text, device, threads)
    if name == "clip":
        from curation.scorers.clip_scores import ClipScorer

        return ClipScorer(config.clip, device, threads)
    if name == "caption":
        from curation.scorers.captions import CocaCaptioner

        return CocaCaptioner(config.caption, device, threads)
    if name == "video_caption":
        from curation.scorers.video_captions import GitVideoCaptioner

        return GitVideoCaptioner(config.video_caption, device, threads)
    if name == "llm_summary":
        from curation.scorers.llm_summary import LlmCaptionSummarizer

        return LlmCaptionSummarizer(config.llm_summary, device, threads)
    if name == "raft":
        from curation.scorers.raft_motion import RaftMotionScorer

        return RaftMotionScorer(config.raft, device, threads)
    raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")


def pool_config(name: str, config: ScorersConfig):
    """The ActorPoolConfig of scorer `name`."""
    if name not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
    return getattr(config, name).pool
