"""SV3D-style per-frame camera embedding of the video U-Net (model/multiview.py says when and why it is used)."""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import Timesteps

CAMERA_FEATURES = 256  # sinusoidal features per angle (SVD's micro-conditions use 256 each)


class CameraEmbedding(torch.nn.Module):
    """SV3D-style per-frame camera embedding: sin/cos features of elevation and azimuth (radians) -> MLP ->
    a vector added to each frame's time embedding."""

    def __init__(self, time_embed_dim: int, features: int = CAMERA_FEATURES) -> None:
        super().__init__()
        self.project = Timesteps(features, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.linear_1 = torch.nn.Linear(2 * features, time_embed_dim)
        self.act = torch.nn.SiLU()
        self.linear_2 = torch.nn.Linear(time_embed_dim, time_embed_dim)
        torch.nn.init.zeros_(self.linear_2.weight)  # starts as "no camera": the finetune starts from SVD exactly
        torch.nn.init.zeros_(self.linear_2.bias)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        """(B, T, 2) degrees -> (B * T, time_embed_dim)."""
        radians = camera.flatten(0, 1).float() * (math.pi / 180.0)
        features = torch.cat([self.project(radians[:, 0]), self.project(radians[:, 1])], dim=1)
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(features)))
