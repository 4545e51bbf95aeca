"""Multi-view generation with an image-to-video model (docs/multiview.md, docs/recipe.md §7): how the camera reaches
the U-Net, for training (training/data.py, training/trainer.py) and sampling (generation/multiview.py) alike.

Two ways, both on SVD's image-to-video path (the conditioning image is view 0, the frames are the orbit):

* SVD-MV (the SVD paper's multi-view finetune): no new layers. The orbit's elevation is one of SVD's
  micro-conditions: it takes the place of the motion bucket id (`ELEVATION_MICRO_CONDITION`), and the fps
  micro-condition is a constant (`MULTIVIEW_FPS`), since an orbit of N views has no frame rate of its own.
  [open] which micro-condition the paper uses could not be quoted from its text here (docs/multiview.md); the
  choice is one constant in this module. The export is a plain diffusers SVD folder.
* SV3D-style camera embeddings (`camera_embedding=True` on the U-Net): per frame, sinusoidal embeddings of
  the elevation and the azimuth relative to view 0 (radians), through a two-layer MLP, added to the U-Net's
  time embedding of that frame. The MLP's output layer starts at zero, so a finetune starts from SVD exactly.
  These are new layers: diffusers' `StableVideoDiffusionPipeline` cannot run them, so such exports keep this
  project's class names and load with `lvd generate` / `model.loading.load_pipeline` only.

`camera` tensors are (B, T, 2): [elevation_deg, azimuth_deg] per frame.
"""

from __future__ import annotations

from typing import Any

import torch

MULTIVIEW_FPS = 7  # [open] the fps micro-condition of every orbit (SVD's default frame rate)
ELEVATION_MICRO_CONDITION = "motion_bucket_id"  # [open] the micro-condition that carries the elevation (degrees)


def camera_micro_conditioning(elevation_deg: float | torch.Tensor) -> dict[str, Any]:
    """The `fps` and `motion_bucket_id` arguments that carry an orbit's elevation (SVD-MV style)."""
    return {"fps": MULTIVIEW_FPS, ELEVATION_MICRO_CONDITION: elevation_deg}


def relative_azimuths(azimuths_deg: list[float] | tuple[float, ...]) -> list[float]:
    """Azimuths relative to the first view (the conditioning image), in [0, 360)."""
    return [float((azimuth - azimuths_deg[0]) % 360.0) for azimuth in azimuths_deg]


def orbit_camera(elevation_deg: float, views: int) -> torch.Tensor:
    """(views, 2) cameras of an evenly spaced orbit at one elevation, azimuths relative to view 0."""
    azimuths = torch.arange(views, dtype=torch.float32) * (360.0 / views)
    return torch.stack([torch.full((views,), float(elevation_deg)), azimuths], dim=1)


def with_camera_embedding(unet):
    """A copy of `unet` (a VideoUNet) with a fresh, zero-output camera embedding; every other weight kept."""
    from model.unet import VideoUNet

    if getattr(unet.config, "camera_embedding", False):
        return unet
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    extended = VideoUNet.from_config({**config, "camera_embedding": True})
    missing, unexpected = extended.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not name.startswith("camera_mlp.") for name in missing):
        raise ValueError(f"camera embedding: unexpected weights {unexpected[:3]}, missing {missing[:3]}")
    return extended.to(device=unet.device, dtype=unet.dtype).train(unet.training)


def multiview_arguments(pipe, views: int, elevation_deg: float) -> dict[str, Any]:
    """The image-to-video pipeline arguments of an orbit of `views` views at `elevation_deg`: frames, the
    micro-conditions that carry the elevation, and per-frame cameras when the U-Net has a camera embedding."""
    arguments: dict[str, Any] = {"num_frames": views, **camera_micro_conditioning(elevation_deg)}
    if getattr(pipe.unet.config, "camera_embedding", False):
        arguments["camera"] = orbit_camera(elevation_deg, views)[None]
    return arguments
