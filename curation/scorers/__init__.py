"""Learned curation scorers (docs/recipe.md §1): text area, CLIP aesthetics + text score, the three captioners
(CoCa on the middle frame, a GIT video captioner, an LLM summary of both), RAFT motion.

Each scorer follows the `ClipScorer` protocol of curation/types.py and loads its model once; actors in
curation/actors.py hold one each. `build_scorer` is the single place that maps a name to its class.
"""

from __future__ import annotations

import importlib
from typing import Any

from curation.scorers.config import ScorersConfig

# Scorer name (also its settings field in ScorersConfig) -> (module, class); loaded only when built.
SCORER_CLASSES: dict[str, tuple[str, str]] = {
    "text": ("curation.scorers.text_area", "TextAreaScorer"),
    "caption": ("curation.scorers.captions", "CocaCaptioner"),
    "video_caption": ("curation.scorers.video_captions", "GitVideoCaptioner"),
    "llm_summary": ("curation.scorers.llm_summary", "LlmCaptionSummarizer"),
    "clip": ("curation.scorers.clip_scores", "ClipScorer"),
    "raft": ("curation.scorers.raft_motion", "RaftMotionScorer"),
}
SCORER_NAMES = tuple(SCORER_CLASSES)


def build_scorer(name: str, config: ScorersConfig, device: str = "auto", threads: int = 1) -> Any:
    """Instantiate (and load the model of) the scorer called `name` from its part of `config`."""
    if name not in SCORER_CLASSES:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
    module, cls = SCORER_CLASSES[name]
    return getattr(importlib.import_module(module), cls)(getattr(config, name), device, threads)


def pool_config(name: str, config: ScorersConfig):
    """The ActorPoolConfig of scorer `name`."""
    if name not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
    return getattr(config, name).pool
