"""The training-time caption mix: which of a clip's captions the trainer conditions on.

A clip's `captions` struct holds up to one caption per captioner (CoCa on the middle frame, a video
captioner, an LLM summary of both). Each training sample draws one of them with weights 0.5 / 0.25 / 0.25,
renormalised over the captions the clip actually has.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from dataformat.schema import CAPTION_SOURCES, Column

CAPTION_MIX: Mapping[str, float] = MappingProxyType({"coca": 0.5, "video": 0.25, "llm_summary": 0.25})


def check_caption_mix(mix: Mapping[str, float]) -> None:
    """A clear error for a mix naming an unknown captioner, a negative weight, or no weight at all."""
    unknown = set(mix) - set(CAPTION_SOURCES)
    if unknown or any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"caption mix: weights >= 0 over {CAPTION_SOURCES} with a positive sum, got {dict(mix)}")


def pick_caption(
    captions: Mapping[str, str | None] | None, rng: np.random.Generator, mix: Mapping[str, float] = CAPTION_MIX
) -> str | None:
    """One of `captions` drawn with `mix`'s weights renormalised over the non-empty ones; None if none is."""
    present = {name: weight for name, weight in mix.items() if weight > 0 and captions and captions.get(name)}
    if not present:
        return None
    names = sorted(present)
    weights = np.array([present[name] for name in names], dtype=np.float64)
    return captions[names[rng.choice(len(names), p=weights / weights.sum())]]


def training_caption(
    meta: Mapping[str, Any], text: str | None, rng: np.random.Generator, mix: Mapping[str, float] = CAPTION_MIX
) -> str:
    """The caption of a training sample: drawn from its `captions` struct, else its `caption` column, else
    its `.txt` member, else ''."""
    return pick_caption(meta.get(Column.CAPTIONS), rng, mix) or meta.get(Column.CAPTION) or text or ""
