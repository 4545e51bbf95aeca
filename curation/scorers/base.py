"""What every learned scorer shares: device choice, weight-path checks, input checks, per-clip isolation.

The `ClipScorer` contract (curation/types.py) says one bad clip never fails a batch: its columns are
None and an `error` says why. `score_isolated` implements that once for all scorers: clips with
unusable frames are refused up front, and if a batched forward still fails, the batch is retried one
clip at a time so only the culprit gets an error row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.devices import pick_device
from common.weights import MissingWeightsError, require_file
from curation.types import ClipFrames

# What every learned scorer shares, importable from here: device choice and weight-path checks live in common/.
__all__ = ["MissingWeightsError", "check_frames", "chunks", "error_row", "pick_device", "require_file", "scorer_device",
           "score_isolated"]

logger = logging.getLogger(__name__)

MIN_FRAME_SIDE = 16



def scorer_device(config: Any, device: str, threads: int) -> str:
    """Pick a scorer's device before any weights load (its settings were checked when they were built); on the
    CPU torch gets the actor's `threads` (an actor owns that many cores, no more)."""
    chosen = pick_device(device)
    if chosen == "cpu":
        import torch

        torch.set_num_threads(threads)
    return chosen


def check_frames(clip: ClipFrames) -> str | None:
    """Why a clip's frames cannot be scored, or None when they are fine."""
    frames = clip.frames
    if not isinstance(frames, np.ndarray):
        return f"frames must be a numpy array, got {type(frames).__name__}"
    if frames.ndim != 4 or frames.shape[-1] != 3:
        return f"frames must have shape (N, H, W, 3), got {tuple(frames.shape)}"
    if frames.shape[0] == 0:
        return "no frames"
    if frames.dtype != np.uint8:
        return f"frames must be uint8 RGB, got {frames.dtype}"
    if min(frames.shape[1:3]) < MIN_FRAME_SIDE:
        return f"frames of {frames.shape[2]}x{frames.shape[1]} px are smaller than {MIN_FRAME_SIDE} px"
    return None


def error_row(columns: Sequence[str], error: str) -> dict[str, Any]:
    return {**dict.fromkeys(columns), "error": error}


def score_isolated(
    batch: Sequence[ClipFrames],
    columns: Sequence[str],
    scorer_name: str,
    score_valid: Callable[[list[ClipFrames]], list[dict[str, Any]]],
    extra_check: Callable[[ClipFrames], str | None] | None = None,
    needs_frames: bool = True,
) -> list[dict[str, Any]]:
    """Run `score_valid` on the clips that pass the checks; isolate failures to the clip that caused them.
    `needs_frames=False` skips the frame checks (a scorer of text, such as the LLM summary)."""
    rows: list[dict[str, Any] | None] = [None] * len(batch)
    valid_index: list[int] = []
    for i, clip in enumerate(batch):
        problem = (check_frames(clip) if needs_frames else None) or (extra_check(clip) if extra_check else None)
        if problem:
            rows[i] = error_row(columns, f"{scorer_name}: {problem}")
        else:
            valid_index.append(i)
    if valid_index:
        valid = [batch[i] for i in valid_index]
        try:
            results = score_valid(valid)
        except Exception as batch_error:  # a batch failed: find the clip(s) responsible
            if len(valid) == 1:
                results = [error_row(columns, f"{scorer_name}: {type(batch_error).__name__}: {batch_error}")]
            else:
                logger.warning("%s: batch of %d failed (%s); retrying clip by clip", scorer_name,
                               len(valid), batch_error)
                results = [
                    score_isolated([clip], columns, scorer_name, score_valid, extra_check, needs_frames)[0]
                    for clip in valid
                ]
        for i, row in zip(valid_index, results, strict=True):
            rows[i] = row
    return [row if row is not None else error_row(columns, f"{scorer_name}: not scored") for row in rows]


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most `size` items (size < 1 means everything at once)."""
    if size < 1:
        return [items] if len(items) else []
    return [items[i : i + size] for i in range(0, len(items), size)]
