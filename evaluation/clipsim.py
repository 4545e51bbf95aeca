"""CLIPSIM: CLIP text-video similarity, the mean over frames of cos(CLIP image(frame), CLIP text(prompt)).

Reported next to FVD in zero-shot text-to-video papers (as a raw cosine, not x100). Weights are local only
(open_clip `model_name` + `pretrained` file, or `local-dir:/folder`), loaded with the loader the curation
scorers use (common.openclip), so the same settings work here and there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ClipSimilarity:
    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "auto",
                 frames_per_forward: int = 64) -> None:
        import open_clip

        from common.devices import pick_device
        from common.openclip import load_open_clip

        self.device = pick_device(device)
        self.model, self.preprocess_cfg = load_open_clip(model_name, pretrained, "clipsim", self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.frames_per_forward = frames_per_forward
        self.model_name, self.pretrained = model_name, pretrained

    def __call__(self, clips: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Per-video CLIPSIM (B,) for uint8 clips (B, T, H, W, 3) and their prompts."""
        import torch

        from common.openclip import frames_to_model_input, resize_for_model

        clips = np.asarray(clips)
        if clips.ndim != 5 or len(clips) != len(prompts):
            raise ValueError(f"need (B, T, H, W, 3) clips and B prompts, got {clips.shape} and {len(prompts)}")
        batch, frames = clips.shape[:2]
        flat = resize_for_model(clips.reshape(batch * frames, *clips.shape[2:]), self.preprocess_cfg)
        with torch.inference_mode():
            images = torch.cat([
                torch.nn.functional.normalize(self.model.encode_image(
                    frames_to_model_input(flat[i : i + self.frames_per_forward], self.preprocess_cfg, self.device)
                ).float(), dim=-1)
                for i in range(0, len(flat), self.frames_per_forward)
            ]).reshape(batch, frames, -1)
            texts = torch.nn.functional.normalize(
                self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
            return (images * texts[:, None]).sum(-1).mean(1).double().cpu().numpy()
