"""The study's copies of the videos: every video transcoded once to VP9 WebM, and the degraded copies of gold pairs.

Both sides of every pair are re-encoded the same way (same codec, same constant quality), so a rater never
compares one system's compression with another's, and the page plays them in any current browser.
A gold pair's degraded copy is obviously worse on every axis: a heavy Gaussian blur (sigma = 1/40 of the
short side) and three frames of every four dropped (each kept frame held for four), so the video both smears
and stutters. A rater who prefers it, or has no preference, is not watching.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.video import read_frames, write_webm
from dataformat.atomic import temporary_path

DEFAULT_FPS = 8.0
GOLD_HOLD = 4  # every 4th frame kept, held for 4 frames
GOLD_BLUR_FRACTION = 1 / 40


def load_video(source: str | Path) -> tuple[list[np.ndarray], float]:
    """Frames and frame rate of a system's video; an unreadable file is a ValueError naming it."""
    import av

    try:
        frames, fps = read_frames(source)
    except (av.FFmpegError, OSError, ValueError) as error:
        raise ValueError(f"{source}: cannot decode ({' '.join(str(error).split())})") from None
    if not frames:
        raise ValueError(f"{source}: no frames")
    return frames, fps if fps and 0 < fps < 1000 else DEFAULT_FPS


def degrade(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The gold copy: heavy blur and frame drops (module docstring), same length and size."""
    import cv2

    sigma = max(2.0, min(frames[0].shape[:2]) * GOLD_BLUR_FRACTION)
    held = [frames[index - index % GOLD_HOLD] for index in range(len(frames))]
    return [cv2.GaussianBlur(frame, (0, 0), sigmaX=sigma) for frame in held]


def write_study_video(frames: list[np.ndarray], fps: float, destination: Path, crf: int) -> Path:
    """`frames` as VP9 WebM at `destination`, renamed into place when complete."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(destination)  # write_webm names the container format itself
    try:
        write_webm(temporary, frames, fps, crf=crf)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    return destination
