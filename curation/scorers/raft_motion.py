"""RAFT motion for the stage III high-quality subset (docs/recipe.md §1: "HQ stage uses RAFT at 800x450").

Frames are sampled from the clip file at `sample_fps` (2 fps, as the Farneback score), resized to
width x height (800x450; other aspect ratios are stretched to it, as the paper fixes the size), and
RAFT (torchvision, weights from `scorers.raft.weights`) estimates the flow of each consecutive pair.
`raft_motion` = mean flow magnitude over pixels and pairs divided by the time between the two frames:
pixels per second at 800x450, comparable across clips whatever their frame rate.

RAFT needs sides divisible by 8 (450 is not): inputs are edge-padded to the next multiple of 8 and the
flow is cropped back before averaging.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.scorers.base import require_file, score_isolated, scorer_device
from curation.scorers.config import RaftConfig
from curation.types import ClipFrames

logger = logging.getLogger(__name__)


def build_raft(architecture: str):
    """An uninitialised torchvision RAFT of the named size (weights are loaded from a file afterwards); the name is
    one of `RAFT_ARCHITECTURES`, which `RaftConfig.architecture` checks."""
    from torchvision.models.optical_flow import raft_large, raft_small

    return {"raft_large": raft_large, "raft_small": raft_small}[architecture](weights=None, progress=False)


def pair_schedule(num_frames: int, fps: float, sample_fps: float, max_pairs: int) -> list[tuple[int, int]]:
    """Frame-index pairs (a, b), b the next 1/sample_fps sample after a, at most `max_pairs`, evenly spread."""
    if num_frames < 2 or fps <= 0:
        return []
    step = max(1, round(fps / sample_fps))
    samples = list(range(0, num_frames, step))
    if len(samples) < 2:  # a clip shorter than one sampling interval: its first and last frame
        samples = [0, num_frames - 1]
    pairs = list(zip(samples[:-1], samples[1:], strict=True))
    if len(pairs) > max_pairs:
        keep = np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)
        pairs = [pairs[i] for i in sorted(set(keep.tolist()))]
    return pairs


def sample_raft_frames(
    clip_path: str | Path, clip_id: str, fps: float, num_frames: int, config: RaftConfig
) -> ClipFrames:
    """Decode a clip file once and keep only the frames of its RAFT pairs, already at width x height.

    `num_frames` is the clip's length from its manifest row. The result holds the pairs flattened
    (a0, b0, a1, b1, ...) and, in `extra['pair_seconds']`, each pair's time step; pairs the file turns
    out not to contain (shorter than its row says) are left out.
    """
    from common.video import frame_rgb
    from curation.decode import stream_frames

    pairs = pair_schedule(num_frames, fps, config.sample_fps, config.max_pairs)
    wanted: dict[int, np.ndarray] = {}
    needed = {index for pair in pairs for index in pair}
    if needed:
        last = max(needed)
        for index, frame in enumerate(stream_frames(clip_path)):
            if index in needed:
                wanted[index] = frame_rgb(frame, config.width, config.height)  # upright, as displayed
            if index >= last:
                break
    pairs = [(a, b) for a, b in pairs if a in wanted and b in wanted]
    if not pairs:
        return ClipFrames(clip_id=clip_id, frames=np.zeros((0, config.height, config.width, 3), np.uint8))
    frames = np.stack([wanted[index] for pair in pairs for index in pair])
    return ClipFrames(clip_id=clip_id, frames=frames, extra={"pair_seconds": [(b - a) / fps for a, b in pairs]})


class RaftMotionScorer:
    """`raft_motion` (pixels per second at width x height) for clips given as flattened frame pairs."""

    name = "raft"
    columns = ("raft_motion",)

    def __init__(self, config: RaftConfig | None = None, device: str = "auto", threads: int = 1) -> None:
        import torch

        self.config = config or RaftConfig()
        self.device = scorer_device(self.config, device, threads)
        started = time.perf_counter()
        path = require_file(self.config.weights, "scorers.raft.weights", f"RAFT ({self.config.architecture})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_raft(self.config.architecture)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"scorers.raft.weights={str(path)!r} does not fit scorers.raft.architecture="
                f"{self.config.architecture!r}: {str(error).splitlines()[0]}"
            ) from error
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return {"architecture": self.config.architecture, "weights": self.config.weights, "device": self.device,
                "size": f"{self.config.width}x{self.config.height}"}

    def _to_input(self, frames: np.ndarray):
        """uint8 (N, H, W, 3) -> float (N, 3, H8, W8) in [-1, 1], edge-padded to multiples of 8."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        if frames.shape[1:3] != (cfg.height, cfg.width):
            frames = np.stack([cv2.resize(f, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA) for f in frames])
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float()
        x = x / 127.5 - 1.0
        pad_h, pad_w = (-cfg.height) % 8, (-cfg.width) % 8
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x

    def pair_magnitudes(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Mean flow magnitude (pixels at width x height) of each pair (first[i], second[i])."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(first), self.config.pairs_per_forward):
                stop = start + self.config.pairs_per_forward
                a, b = self._to_input(first[start:stop]), self._to_input(second[start:stop])
                flow = self.model(a, b, num_flow_updates=self.config.num_flow_updates)[-1]
                flow = flow[:, :, : self.config.height, : self.config.width].float()
                out.append(flow.norm(dim=1).mean(dim=(1, 2)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @staticmethod
    def _check_pairs(clip: ClipFrames) -> str | None:
        if len(clip.frames) < 2 or len(clip.frames) % 2:
            return f"RAFT needs frame pairs (an even number >= 2 of frames), got {len(clip.frames)}"
        seconds = clip.extra.get("pair_seconds")
        if seconds is not None and (len(seconds) != len(clip.frames) // 2 or min(seconds) <= 0):
            return "extra['pair_seconds'] must give one positive time step per pair"
        return None

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        counts = [len(clip.frames) // 2 for clip in batch]
        first = np.concatenate([clip.frames[0::2] for clip in batch])
        second = np.concatenate([clip.frames[1::2] for clip in batch])
        magnitudes = self.pair_magnitudes(first, second)
        rows, offset = [], 0
        default_step = 1.0 / self.config.sample_fps
        for clip, count in zip(batch, counts, strict=True):
            seconds = np.asarray(clip.extra.get("pair_seconds") or [default_step] * count, dtype=np.float64)
            rows.append({"raft_motion": float(np.mean(magnitudes[offset : offset + count] / seconds))})
            offset += count
        return rows

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, "raft_motion", self._score_valid, self._check_pairs)
