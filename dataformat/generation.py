"""The record written beside each generated video: what it was generated from.

    DIR/NNN.mp4   (and NNN.gif)    the video
    DIR/NNN.json                   {"prompt", "image", "image_sha256", "seed", "checkpoint", "settings"}

Whatever compares generations (a preference study pairs the videos two checkpoints made from the same prompt,
image and seed) reads this record instead of guessing from file names. `image_sha256` is the hash of the
conditioning image's pixels as displayed (null for text-to-video), so the same picture stored in two places or
two formats matches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataformat.atomic import atomic_write_json

GENERATION_RECORD_SUFFIX = ".json"
GENERATION_RECORD_KEYS = ("prompt", "image", "image_sha256", "seed", "checkpoint", "settings")


def generation_record_path(video: str | Path) -> Path:
    """`DIR/NNN.json` for `DIR/NNN.mp4` (every format of one video shares it)."""
    return Path(video).with_suffix(GENERATION_RECORD_SUFFIX)


def write_generation_record(video: str | Path, record: dict[str, Any]) -> Path:
    """The record of `video` (keys GENERATION_RECORD_KEYS, missing ones null), written atomically."""
    return atomic_write_json(generation_record_path(video), {key: record.get(key) for key in GENERATION_RECORD_KEYS})


def read_generation_record(video: str | Path) -> dict[str, Any] | None:
    """The record beside `video`, or None when there is none; a record that is not a JSON object is a ValueError."""
    path = generation_record_path(video)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable generation record ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a generation record must be a JSON object, got {type(record).__name__}")
    return record
