"""The paper's video captioner (docs/recipe.md §1): one caption per clip from several of its frames
-> `captions.video`.

Model family: GIT (Wang et al. 2022, "GIT: A Generative Image-to-text Transformer"), as transformers'
`GitForCausalLM`. Its video checkpoints (microsoft/git-base-vatex, git-large-vatex; MIT licence) encode
each of 6 frames with a CLIP ViT, add a learned temporal embedding per frame and decode one caption over
all of them, so the caption describes what happens across the clip rather than in one frame (CoCa's
job). It is small (hundreds of millions of parameters: it fits next to the other scorers on one GPU),
loads with AutoProcessor + AutoModelForCausalLM from a local directory, and decodes batched with
`generate`.

The decode stage keeps `scorers.video_caption.num_frames` frames at the centres of equal segments of
each clip (taken from its 2 fps samples, so nothing is decoded twice); they are resampled to the
model's number of temporal embeddings if the two differ.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from curation.scorers.base import check_frames, chunks, score_isolated, scorer_device
from curation.scorers.captions import empty_captions
from curation.scorers.config import VideoCaptionConfig
from curation.scorers.transformers_models import load_pretrained, require_model_dir
from curation.types import ClipFrames

SETTING = "scorers.video_caption.model_path"
WHAT = "video captioner"


def resample_indices(available: int, wanted: int) -> np.ndarray:
    """`wanted` indices evenly spread over `available` frames (repeats when there are fewer)."""
    return np.linspace(0, available - 1, wanted).round().astype(int)


def check_video_frames(clip: ClipFrames) -> str | None:
    """Why a clip has no usable video-captioner frames, or None."""
    if clip.video_frames is None:
        return ("no video frames were kept for this clip (it was decoded while the video captioner was off; "
                "curate into a fresh output to caption it)")
    problem = check_frames(ClipFrames(clip.clip_id, clip.video_frames))
    return f"video frames: {problem}" if problem else None


class GitVideoCaptioner:
    """`captions.video` for each clip from a GIT video captioner over its spread frames."""

    name = "video_caption"
    columns = ("captions",)

    def __init__(self, config: VideoCaptionConfig | None = None, device: str = "auto", threads: int = 1) -> None:
        from transformers import AutoModelForCausalLM, AutoProcessor

        self.config = config or VideoCaptionConfig()
        self.device = scorer_device(self.config, device, threads)
        started = time.perf_counter()
        path = require_model_dir(self.config.model_path, SETTING, WHAT)
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, path, SETTING, WHAT)
        if model.config.model_type != "git":
            raise ValueError(f"{WHAT}: `{SETTING}` = {str(path)!r} holds a {model.config.model_type!r} model; "
                             "expected a GIT video captioner (GitForCausalLM, e.g. git-large-vatex)")
        self.model_frames = model.config.num_image_with_embedding
        if not self.model_frames:
            raise ValueError(f"{WHAT}: `{SETTING}` = {str(path)!r} is an image GIT (no temporal embeddings, "
                             "num_image_with_embedding unset); use a video checkpoint such as git-large-vatex")
        self.processor = load_pretrained(AutoProcessor.from_pretrained, path, SETTING, WHAT)
        self.image_processor = getattr(self.processor, "image_processor", None)
        if self.image_processor is None:
            raise ValueError(f"{WHAT}: `{SETTING}` = {str(path)!r} has no image processor (save the GitProcessor "
                             "with the model)")
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model_path, "frames": self.model_frames, "device": self.device,
                "num_beams": self.config.num_beams}

    def caption_videos(self, videos: list[np.ndarray]) -> list[str]:
        """One caption per (K, H, W, 3) uint8 frame stack, `clips_per_forward` clips per `generate`."""
        import torch

        texts: list[str] = []
        with torch.inference_mode():
            for part in chunks(videos, self.config.clips_per_forward):
                frames = [frame for video in part for frame in video[resample_indices(len(video), self.model_frames)]]
                pixels = self.image_processor(images=frames, return_tensors="pt").pixel_values
                pixels = pixels.view(len(part), self.model_frames, *pixels.shape[1:])
                ids = self.model.generate(
                    pixel_values=pixels.to(self.device, self.model.dtype),
                    max_new_tokens=self.config.max_new_tokens,
                    num_beams=self.config.num_beams,
                    do_sample=False,
                )
                texts.extend(text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True))
        return texts

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        rows = []
        for text in self.caption_videos([clip.video_frames for clip in batch]):
            if not text:
                rows.append({"captions": None, "error": "video_caption: the model produced an empty caption"})
                continue
            captions = empty_captions()
            captions["video"] = text
            rows.append({"captions": captions})
        return rows

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, self.name, self._score_valid, check_video_frames)
