"""Learned curation scorers (docs/recipe.md §1): text area, CLIP aesthetics + text score, CoCa captions, RAFT motion.

Each scorer follows the `ClipScorer` protocol of curation/types.py and loads its model once; actors in
curation/actors.py hold one each. `build_scorer` is the single place that maps a name to its class.
"""

from __future__ import annotations

from typing import Any

from curation.scorers.config import ScorersConfig

SCORER_NAMES = ("text", "caption", "clip", "raft")


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
    if name == "raft":
        from curation.scorers.raft_motion import RaftMotionScorer

        return RaftMotionScorer(config.raft, device, threads)
    raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")


def pool_config(name: str, config: ScorersConfig):
    """The ActorPoolConfig of scorer `name`."""
    if name not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
    return getattr(config, name).pool
