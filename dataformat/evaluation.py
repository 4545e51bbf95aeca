"""The on-disk layout of a zero-shot UCF-101 evaluation run (`lvd evaluate-fvd`) and its shard files.

    OUT/videos/<Class>/<index:05d>.mp4   the generated videos
    OUT/shards/<start:05d>-<stop:05d>.npz one file per shard of the protocol's videos (`FvdShard`)
    OUT/sample_grid.jpg                   one middle frame per class
    OUT/results.json                      FVD, KVD, CLIPSIM, counts and every setting

A shard file is an uncompressed numpy .npz with exactly the arrays of `FvdShard` (N videos, K preview clips):
features float (N, 400) I3D logits in protocol order; settings_key str (which settings made it: a shard
from other settings is redone, never mixed in); indices int (N,) protocol video indices; classes str (N,)
their class names; clipsim float (N,) or empty when no CLIP weights were given; preview_classes str (K,)
and preview uint8 (K, T, H, W, 3), the first video of each class in the shard. Written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dataformat.atomic import atomic_write


class EvaluationLayout:
    """Every path of an evaluation run under `out`."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    def video(self, class_name: str, index: int) -> Path:
        return self.videos / class_name / f"{index:05d}.mp4"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, start: int, stop: int) -> Path:
        return self.shards / f"{start:05d}-{stop:05d}.npz"

    @property
    def sample_grid(self) -> Path:
        return self.root / "sample_grid.jpg"

    @property
    def results(self) -> Path:
        return self.root / "results.json"


@dataclass
class FvdShard:
    """The arrays of one shard file (see the module docstring)."""

    features: np.ndarray
    settings_key: str
    indices: np.ndarray
    classes: np.ndarray
    clipsim: np.ndarray
    preview_classes: np.ndarray
    preview: np.ndarray

    def save(self, path: str | Path) -> Path:
        arrays = {field.name: np.asarray(getattr(self, field.name)) for field in fields(self)}
        return atomic_write(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> FvdShard:
        with np.load(path, allow_pickle=False) as stored:
            missing = [field.name for field in fields(cls) if field.name not in stored.files]
            if missing:
                raise ValueError(f"{path}: not an FVD shard file (missing {', '.join(missing)})")
            values = {field.name: stored[field.name] for field in fields(cls)}
        values["settings_key"] = str(values["settings_key"])
        return cls(**values)

    @staticmethod
    def settings_key_of(path: str | Path) -> str | None:
        """The settings key of an existing shard file, or None when there is no readable one."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                return str(stored["settings_key"])
        except (OSError, ValueError, KeyError):
            return None
