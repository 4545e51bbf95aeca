"""Multi-view generation with an image-to-video model (docs/multiview.md, docs/recipe.md §7): how the camera reaches
the U-Net, for training (training/data.py, training/trainer.py) and sampling (generation/multiview.py) alike.

Three ways, all on SVD's image-to-video path (the conditioning image is view 0, the frames are the orbit):

* SVD-MV, the paper's way (`elevation_condition="paper"`, the default; App. D.6 quoted in docs/recipe.md §7):
  the elevation (degrees) is a FOURTH added-time id after [fps - 1, motion bucket, noise aug]. diffusers' U-Net
  embeds each id with the same sinusoidal `add_time_proj` and concatenates them, so `add_embedding.linear_1`
  grows from 3 x 256 = 768 to 4 x 256 = 1024 inputs (`with_elevation_condition`: old columns kept, the new
  ones zero, so the finetune starts from SVD's exact outputs at every elevation). fps and motion bucket stay
  constants (`MULTIVIEW_FPS`, `MULTIVIEW_MOTION_BUCKET`). diffusers' `UNetSpatioTemporalConditionModel` loads
  the export (its config says 1024); its `StableVideoDiffusionPipeline` builds only 3 ids and cannot run it,
  this project's `ImageToVideoPipeline(elevation=...)` can.
* SVD-MV on the motion bucket (`elevation_condition="motion-bucket"`): no new layers. The elevation takes the
  place of the motion bucket id and fps is constant; the export is a plain diffusers SVD folder that the stock
  `StableVideoDiffusionPipeline(motion_bucket_id=<elevation>, fps=7)` runs.
* SV3D-style camera embeddings (`camera_embedding=True` on the U-Net, with either of the above): per frame,
  sinusoidal embeddings of the elevation and the azimuth relative to view 0 (radians), through a two-layer
  MLP, added to the U-Net's time embedding of that frame. The MLP's output layer starts at zero, so a finetune
  starts from SVD exactly. These are new layers: diffusers cannot run them, so such exports keep this
  project's class names and load with `lvd generate` / `model.loading.load_pipeline` only.

[open] the paper does not say in which unit the elevation is embedded, nor which fps / motion bucket SVD-MV
sees; degrees (the scale of SVD's other ids) and SVD's defaults 7 / 127 are this project's choice.

`camera` tensors are (B, T, 2): [elevation_deg, azimuth_deg] per frame.
"""

from __future__ import annotations

from typing import Any

import torch

MULTIVIEW_FPS = 7  # [open] the fps micro-condition of every orbit (SVD's default frame rate)
MULTIVIEW_MOTION_BUCKET = 127  # [open] the paper's way: the motion bucket of every orbit (released SVD's default)
ELEVATION_MICRO_CONDITION = "motion_bucket_id"  # the motion-bucket way: the micro-condition that carries it
ELEVATION_CONDITIONS = ("paper", "motion-bucket")
DEFAULT_ELEVATION_CONDITION = "paper"
SVD_ADDED_TIME_IDS = 3  # [fps - 1, motion bucket, noise aug]; the paper's way adds the elevation as a fourth


def added_time_id_count(unet) -> int:
    """How many added-time ids the U-Net embeds: 3 (SVD), 4 (SVD-MV the paper's way, elevation last)."""
    config = unet.config
    return config.projection_class_embeddings_input_dim // config.addition_time_embed_dim


def takes_elevation(unet) -> bool:
    """Whether the U-Net embeds the elevation as a fourth added-time id (the paper's SVD-MV)."""
    return added_time_id_count(unet) == SVD_ADDED_TIME_IDS + 1


def camera_micro_conditioning(elevation_deg: float | torch.Tensor, condition: str = "motion-bucket") -> dict[str, Any]:
    """The pipeline's micro-condition arguments that carry an orbit's elevation: `fps`, `motion_bucket_id` and,
    the paper's way, `elevation` (the fourth added-time id)."""
    if condition not in ELEVATION_CONDITIONS:
        raise ValueError(f"elevation_condition must be one of {ELEVATION_CONDITIONS}, got {condition!r}")
    if condition == "paper":
        return {"fps": MULTIVIEW_FPS, "motion_bucket_id": MULTIVIEW_MOTION_BUCKET, "elevation": elevation_deg}
    return {"fps": MULTIVIEW_FPS, ELEVATION_MICRO_CONDITION: elevation_deg}


@torch.no_grad()
def with_elevation_condition(unet):
    """A copy of `unet` (a VideoUNet) that embeds the elevation as a fourth added-time id: `add_embedding.linear_1`
    widened by `addition_time_embed_dim` input columns (768 -> 1024 for SVD), the old columns copied, the new ones
    zero, so its outputs equal `unet`'s for every elevation until training moves them. A U-Net that already takes
    the elevation is returned as it is."""
    from model.unet import VideoUNet

    count = added_time_id_count(unet)
    if count == SVD_ADDED_TIME_IDS + 1:
        return unet
    if count != SVD_ADDED_TIME_IDS:
        raise ValueError(f"the elevation condition widens SVD's 3 added-time ids to 4; this U-Net embeds {count}")
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    width = config["addition_time_embed_dim"]
    widened = VideoUNet.from_config({**config, "projection_class_embeddings_input_dim":
                                     config["projection_class_embeddings_input_dim"] + width})
    state = unet.state_dict()
    weight = state["add_embedding.linear_1.weight"]
    state["add_embedding.linear_1.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], width)], dim=1)
    widened.load_state_dict(state)
    return widened.to(device=unet.device, dtype=unet.dtype).train(unet.training)


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
    micro-conditions that carry the elevation the way the U-Net was trained (a fourth id when it embeds one,
    else the motion bucket), and per-frame cameras when the U-Net has a camera embedding."""
    condition = "paper" if takes_elevation(pipe.unet) else "motion-bucket"
    arguments: dict[str, Any] = {"num_frames": views, **camera_micro_conditioning(elevation_deg, condition)}
    if getattr(pipe.unet.config, "camera_embedding", False):
        arguments["camera"] = orbit_camera(elevation_deg, views)[None]
    return arguments
