"""Image-to-video pipeline: SVD / SVD-XT checkpoints in, the frames diffusers' StableVideoDiffusionPipeline gives.

Components and folder layout are SVD's (docs/recipe.md §2b): `unet` (loaded as `model.unet.VideoUNet`,
in_channels 8), `vae` (`AutoencoderKLTemporalDecoder`), `image_encoder` (`CLIPVisionModelWithProjection`),
`feature_extractor` (`CLIPImageProcessor`) and `scheduler` (SVD's `EulerDiscreteScheduler`, which only carries
the noise range here). `from_pretrained(DIR)` loads a diffusers SVD folder; `save_pretrained(DIR)` writes a
folder whose model_index.json and unet config name diffusers' classes (`StableVideoDiffusionPipeline`,
`UNetSpatioTemporalConditionModel`), so `StableVideoDiffusionPipeline.from_pretrained(DIR)` loads it as is.

Sampling is the project's: `model.conditioning` (CLIP image token + unscaled VAE latent of the noise-augmented
frame, micro-conditioning fps - 1), `model.edm` preconditioning, `model.sampling.sample_euler` on the Karras
schedule and `ClassifierFreeGuidance` rising linearly over frames. With a CPU generator and the same settings
it reproduces diffusers' frames (tests/test_image_to_video.py): the random draws come in diffusers' order, the
augmentation noise first, then the initial latents (times sqrt(1 + sigma_max^2)).

API: `pipe(image, height=576, width=1024, num_frames=None (unet config), num_inference_steps=25,
min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
decode_chunk_size=14, generator=..., camera=None, elevation=None) -> ImageToVideoOutput(frames)`, frames uint8
(B, T, H, W, 3). `elevation` (degrees) is the fourth added-time id of an SVD-MV U-Net trained the paper's way
(`projection_class_embeddings_input_dim` 4 x `addition_time_embed_dim`; model/multiview.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from diffusers.utils import BaseOutput

from model.conditioning import (
    ImageConditioning,
    augment_frame,
    clip_image_embedding,
    conditioning_latent,
    micro_conditioning,
)
from model.edm import VPredictionPreconditioning, initial_noise_scale, karras_sigmas
from model.pipeline import decode_output
from model.sampling import ClassifierFreeGuidance, linear_guidance_scales, sample_euler
from model.unet import VideoUNet
from model.vae import scale_factor

ImageInput = PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor

# SVD's inference recipe (diffusers' StableVideoDiffusionPipeline defaults; sgm decodes 14 frames at a time).
SVD_DEFAULTS: dict[str, Any] = dict(
    height=576, width=1024, num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7,
    motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=14,
)
# sgm's sampling defaults for the released models, told apart by the U-Net's frame count
# (scripts/sampling/simple_video_sample.py and configs/svd*.yaml): SVD 14 frames, 25 steps, guidance 1.0 -> 2.5;
# SVD-XT 25 frames, 30 steps, 1.5 -> 3.0. `lvd generate` uses them; other frame counts keep SVD_DEFAULTS.
SGM_SAMPLING_DEFAULTS: dict[int, dict[str, Any]] = {
    14: dict(num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=2.5),
    25: dict(num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0),
}


def sampling_defaults(unet_frames: int) -> dict[str, Any]:
    """SVD_DEFAULTS with sgm's steps and guidance for a U-Net built for `unet_frames` frames (14 SVD, 25 XT)."""
    return {**SVD_DEFAULTS, **SGM_SAMPLING_DEFAULTS.get(unet_frames, {})}


DIFFUSERS_PIPELINE_CLASS = "StableVideoDiffusionPipeline"
DIFFUSERS_UNET_CLASS = "UNetSpatioTemporalConditionModel"


@dataclass
class ImageToVideoOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # uint8 (B, T, H, W, 3), or [-1, 1] frames / latents on request


class ImageToVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->unet->vae"

    def __init__(self, vae, image_encoder, unet: VideoUNet, scheduler: EulerDiscreteScheduler,
                 feature_extractor) -> None:
        super().__init__()
        self.register_modules(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                              feature_extractor=feature_extractor)
        self.preconditioning = VPredictionPreconditioning(sigma_data=1.0)

    # --- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> ImageToVideoPipeline:
        """A diffusers SVD / SVD-XT folder (or this class's export). The U-Net loads as `VideoUNet`."""
        path = Path(pretrained_model_name_or_path)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{pretrained_model_name_or_path} is not a pipeline directory (no model_index.json)")
        if "unet" not in kwargs:
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            unet_kwargs = {"dtype": dtype} if dtype is not None else {}
            kwargs["unet"] = VideoUNet.from_pretrained(path, subfolder="unet", **unet_kwargs)
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' layout, with diffusers' class names where the project subclasses (the U-Net), so the
        folder is a plain `StableVideoDiffusionPipeline` to anyone without this project installed."""
        super().save_pretrained(save_directory, **kwargs)
        if getattr(self.unet.config, "camera_embedding", False):
            return  # new layers (model/multiview.py): diffusers' classes would drop them, so keep ours
        directory = Path(save_directory)
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = DIFFUSERS_PIPELINE_CLASS
        index["unet"] = ["diffusers", DIFFUSERS_UNET_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        unet_config_path = directory / "unet" / "config.json"
        unet_config = json.loads(unet_config_path.read_text())
        unet_config["_class_name"] = DIFFUSERS_UNET_CLASS
        if unet_config.get("spatial_resnet_eps") is None:
            unet_config.pop("spatial_resnet_eps", None)  # diffusers' own layout: nothing to record
        unet_config.pop("camera_embedding", None)  # False here (see above); diffusers' class has no such setting
        unet_config_path.write_text(json.dumps(unet_config, indent=2, sort_keys=True) + "\n")

    # --- steps ----------------------------------------------------------------------------------------------

    def check_inputs(self, image: ImageInput, height: int, width: int, num_frames: int, num_inference_steps: int,
                     decode_chunk_size: int, output_type: str) -> None:
        factor = scale_factor(self.vae)
        if isinstance(image, list):
            if not image or not all(isinstance(item, PIL.Image.Image) for item in image):
                raise ValueError("image must be a PIL image, a non-empty list of PIL images or a (B, 3, H, W) tensor")
        elif isinstance(image, torch.Tensor):
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"an image tensor must be (batch, 3, height, width) in [0, 1], got "
                                 f"{tuple(image.shape)}")
        elif not isinstance(image, PIL.Image.Image):
            raise ValueError(f"image must be a PIL image, a list of them or a tensor, got {type(image).__name__}")
        if height % factor or width % factor or height < factor or width < factor:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        if num_frames < 1 or num_inference_steps < 1:
            raise ValueError(f"num_frames and num_inference_steps must be >= 1, got {num_frames}, "
                             f"{num_inference_steps}")
        if not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be a positive number of frames, got {decode_chunk_size!r}")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")

    def check_elevation(self, elevation: float | torch.Tensor | None) -> None:
        """The elevation goes to a U-Net that embeds it as a fourth added-time id, and only there."""
        ids = self.unet.config.projection_class_embeddings_input_dim // self.unet.config.addition_time_embed_dim
        if ids == 4 and elevation is None:
            raise ValueError("this U-Net embeds the camera elevation as a fourth added-time id (an SVD-MV finetune, "
                             "the paper's way): pass elevation=<degrees> (lvd generate --elevation DEG)")
        if ids != 4 and elevation is not None:
            raise ValueError(f"elevation given, but this U-Net embeds {ids} added-time ids, not SVD-MV's 4 "
                             "(fps, motion bucket, noise aug, elevation): leave elevation out")

    @staticmethod
    def prepare_images(image: ImageInput, height: int, width: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(each image at its own size, for CLIP; the batch at height x width, for the VAE), both in [-1, 1].

        PIL images are resized with Lanczos, as diffusers' VideoProcessor does; tensors ([0, 1]) bicubic."""
        if isinstance(image, torch.Tensor):
            unit = image.float().clamp(0, 1)
            resized = unit if unit.shape[-2:] == (height, width) else F.interpolate(
                unit, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            return [item[None] * 2 - 1 for item in unit], resized * 2 - 1
        images = [image] if isinstance(image, PIL.Image.Image) else list(image)
        images = [item.convert("RGB") for item in images]
        originals = [_pil_to_tensor(item) for item in images]
        resized = torch.cat([_pil_to_tensor(item.resize((width, height), PIL.Image.LANCZOS)) for item in images])
        return originals, resized

    def encode_conditioning(self, originals: list[torch.Tensor], resized: torch.Tensor, noise: torch.Tensor,
                            noise_aug_strength: float) -> ImageConditioning:
        """CLIP token of each clean image and the unscaled VAE latent of the noise-augmented resized batch."""
        embedding = torch.cat([clip_image_embedding(self.image_encoder, self.feature_extractor, item)
                               for item in originals])
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            latent = conditioning_latent(self.vae, augment_frame(resized, noise_aug_strength, noise))
        finally:
            if upcast:
                self.vae.to(torch.float16)
        return ImageConditioning(embedding=embedding, latent=latent.to(embedding.dtype))

    def prepare_latents(self, batch: int, num_frames: int, height: int, width: int, generator, latents) -> torch.Tensor:
        """Initial noise (B, T, 4, h, w) at sigma_max: randn * sqrt(1 + sigma_max^2)."""
        factor = scale_factor(self.vae)
        shape = (batch, num_frames, self.unet.config.out_channels, height // factor, width // factor)
        if latents is None:
            latents = _randn(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.float() * initial_noise_scale(self.scheduler.config.sigma_max)

    # --- call -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        height: int = SVD_DEFAULTS["height"],
        width: int = SVD_DEFAULTS["width"],
        num_frames: int | None = None,
        num_inference_steps: int = SVD_DEFAULTS["num_inference_steps"],
        min_guidance_scale: float = SVD_DEFAULTS["min_guidance_scale"],
        max_guidance_scale: float = SVD_DEFAULTS["max_guidance_scale"],
        fps: int = SVD_DEFAULTS["fps"],
        motion_bucket_id: int = SVD_DEFAULTS["motion_bucket_id"],
        noise_aug_strength: float = SVD_DEFAULTS["noise_aug_strength"],
        decode_chunk_size: int = SVD_DEFAULTS["decode_chunk_size"],
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        progress: bool = True,
        camera: torch.Tensor | None = None,
        elevation: float | torch.Tensor | None = None,
    ) -> ImageToVideoOutput:
        """Animate `image` (PIL image(s), or a (B, 3, H, W) tensor in [0, 1]). `fps` is the frame rate the
        video should have (the model sees fps - 1); guidance rises linearly from the first to the last frame
        and is skipped (one conditional pass) when `max_guidance_scale` <= 1, as in diffusers. `camera` (B, T, 2):
        per-frame [elevation, azimuth] degrees for a U-Net with a camera embedding; `elevation` (degrees, a number
        or one per image): the fourth added-time id of an SVD-MV U-Net trained the paper's way (model/multiview.py),
        required by such a U-Net and refused by any other."""
        # 1. inputs
        num_frames = num_frames or self.unet.config.num_frames
        self.check_inputs(image, height, width, num_frames, num_inference_steps, decode_chunk_size, output_type)
        self.check_elevation(elevation)
        device, dtype = self._execution_device, self.unet.dtype
        guided = max_guidance_scale > 1

        # 2. conditioning: augmentation noise is the first draw from the generator, as in diffusers
        originals, resized = self.prepare_images(image, height, width)
        batch = resized.shape[0]
        noise = _randn(tuple(resized.shape), generator)
        conditioning = self.encode_conditioning([o.to(device) for o in originals], resized.to(device),
                                                noise.to(device), noise_aug_strength)
        if guided:
            conditioning = conditioning.with_unconditional()
        conditioning = ImageConditioning(conditioning.embedding.to(device, dtype),
                                         conditioning.latent.to(device, dtype))
        if elevation is not None and guided:  # one value per image: the unconditional half sees the same
            elevation = torch.as_tensor(elevation, dtype=torch.float64).reshape(-1)
            elevation = torch.cat([elevation, elevation]) if elevation.numel() > 1 else elevation
        ids = micro_conditioning(fps, motion_bucket_id, noise_aug_strength, batch_size=conditioning.latent.shape[0],
                                 device=device, dtype=dtype, elevation=elevation)

        if camera is not None:  # per-frame cameras: the same for the unconditional half of guidance
            camera = camera.to(device=device, dtype=torch.float32)
            camera = torch.cat([camera, camera]) if guided else camera
        unet_camera = {"camera": camera} if camera is not None else {}

        # 3. initial latents: the second draw
        x = self.prepare_latents(batch, num_frames, height, width, generator, latents).to(device)

        # 4. denoise: EDM preconditioning around the U-Net, Euler on the Karras schedule
        def network(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            # c_noise stays float32 (diffusers passes the timestep unrounded too)
            return self.unet(conditioning.model_input(x_in.to(dtype)), c_noise,
                             encoder_hidden_states=conditioning.embedding, added_time_ids=ids,
                             **unet_camera).sample.float()

        def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.preconditioning.denoise(network, x_t, sigma)

        if guided:
            denoiser = ClassifierFreeGuidance(denoiser, linear_guidance_scales(num_frames, min_guidance_scale,
                                                                               max_guidance_scale))
        config = self.scheduler.config
        sigmas = karras_sigmas(num_inference_steps, config.sigma_min, config.sigma_max).to(device)
        x = sample_euler(denoiser, x, sigmas, disable=not progress)
        self.maybe_free_model_hooks()

        # 5. decode (in chunks of frames that never straddle two videos)
        return ImageToVideoOutput(frames=decode_output(self.vae, x, decode_chunk_size, output_type))


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from an RGB PIL image (float32 / 255 first, as diffusers rounds it)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def _randn(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal float32 draws on the generator's device (CPU by default), as diffusers' randn_tensor."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def is_image_to_video_folder(path: str | Path) -> bool:
    """Whether a pipeline folder is SVD-shaped (an image encoder, no text encoder)."""
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        return False
    index = json.loads(index_path.read_text())
    return index.get("_class_name") in (DIFFUSERS_PIPELINE_CLASS, ImageToVideoPipeline.__name__) or (
        "image_encoder" in index and "text_encoder" not in index)
