"""Text-to-video pipeline: CLIP text -> video U-Net + EDM Euler sampling with frame-wise CFG -> VAE decode.

A diffusers `DiffusionPipeline`, so `save_pretrained` / `from_pretrained` write and read a directory of
safetensors components (unet, vae, text_encoder, tokenizer, scheduler), and `enable_model_cpu_offload`,
`.to(dtype)` and attention-processor settings work as users expect. The scheduler component only
carries SVD's noise range (sigma_min 0.002, sigma_max 700); sampling is `model.sampling.sample_euler`
on the Karras schedule, which matches diffusers' EulerDiscreteScheduler configured like SVD (tested).

API: `TextToVideoPipeline.from_preset("tiny", seed=0)`, `TextToVideoPipeline(unet=..., vae=..., text_encoder=...,
tokenizer=..., scheduler=...)`,
`pipe(prompt, num_frames=14, height=320, width=576, num_inference_steps=25, guidance_scale=7.0 or (1.0, 2.5),
fps=7 (the model sees fps - 1), motion_bucket_id=127, generator=..., decode_chunk_size=8) ->
TextToVideoOutput(frames)` with frames uint8 (B, T, H, W, 3); `common.video.save_video(frames, path, fps)` writes
.mp4 or .gif.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from diffusers.utils import BaseOutput

from common.requests import RequestError
from model.conditioning import micro_conditioning
from model.edm import VPredictionPreconditioning, initial_noise_scale, karras_sigmas
from model.sampling import ClassifierFreeGuidance, linear_guidance_scales, sample_euler
from model.text import encode_prompts, tiny_text_encoder
from model.unet import VideoUNet
from model.vae import decode_latents, scale_factor, tiny_vae

SVD_SCHEDULER_CONFIG = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)

# Text-to-video guides every frame equally (the paper's UCF-101 numbers use w = 7); the linear ramp over
# frames is SVD's image-to-video recipe, where the first frame is pinned by the conditioning image.
DEFAULT_TEXT_GUIDANCE = 7.0


@dataclass
class TextToVideoOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # uint8 (B, T, H, W, 3), or latents / float frames on request


class TextToVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet: VideoUNet, vae, text_encoder, tokenizer, scheduler: EulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.preconditioning = VPredictionPreconditioning(sigma_data=1.0)

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0) -> TextToVideoPipeline:
        """A whole random pipeline of the given size (weights untrained): tests, the demo, stage I init."""
        if name != "tiny":
            raise ValueError(f"only the 'tiny' preset builds without weights; for {name!r} load a checkpoint "
                             "(TextToVideoPipeline.from_sd_checkpoint or from_pretrained)")
        torch.manual_seed(seed)
        unet = VideoUNet.from_preset("tiny")
        text_encoder, tokenizer = tiny_text_encoder(hidden_size=unet.config.cross_attention_dim, seed=seed)
        return cls(unet=unet, vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
                   scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))

    @classmethod
    def from_sd_checkpoint(cls, path_or_hub_id: str, num_frames: int = 14, **kwargs) -> TextToVideoPipeline:
        """Stage I initialisation from SD 2.x (e.g. `stabilityai/stable-diffusion-2-1` or a local copy):
        its VAE, OpenCLIP ViT-H text encoder and tokenizer, and its U-Net inflated with temporal layers."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        return cls(
            unet=VideoUNet.from_image_unet(path_or_hub_id, num_frames=num_frames, subfolder="unet", **kwargs),
            vae=AutoencoderKL.from_pretrained(path_or_hub_id, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(path_or_hub_id, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(path_or_hub_id, subfolder="tokenizer", **kwargs),
            scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        )

    # --- steps ----------------------------------------------------------------------------------------------

    def check_inputs(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None,
                     negative_prompt_embeds: torch.Tensor | None, height: int, width: int, num_frames: int,
                     output_type: str, init_latents: torch.Tensor | None, init_sigma: float | None) -> None:
        """Every argument error before any model runs (latent shapes are checked where they are made)."""
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            if prompt_embeds.ndim not in (3, 4) or prompt_embeds.shape[0] < 1:
                raise ValueError(f"prompt_embeds must be (B, tokens, dim) or (B, frames, tokens, dim), "
                                 f"got {tuple(prompt_embeds.shape)}")
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match "
                                 f"prompt_embeds {tuple(prompt_embeds.shape)}")
            if prompt_embeds.ndim == 4 and prompt_embeds.shape[1] != num_frames:
                raise ValueError(f"per-frame prompt_embeds have {prompt_embeds.shape[1]} frames, "
                                 f"num_frames={num_frames}")
        elif prompt is None:
            raise ValueError("prompt (or prompt_embeds) is required")
        elif not isinstance(prompt, str) and not list(prompt):
            raise ValueError("prompt list is empty")
        factor = scale_factor(self.vae)
        if height % factor or width % factor or num_frames < 1:
            raise ValueError(f"height and width must be multiples of {factor} and num_frames >= 1, "
                             f"got {height}x{width}x{num_frames}")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        if init_latents is None and init_sigma is not None:
            raise ValueError("init_sigma needs init_latents (the clean latents to re-noise)")
        sigma_min, sigma_max = self.scheduler.config.sigma_min, self.scheduler.config.sigma_max
        if init_latents is not None and (init_sigma is None or not sigma_min < init_sigma <= sigma_max):
            raise ValueError(f"init_sigma must be in ({sigma_min}, {sigma_max}] with init_latents, got {init_sigma}")

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None) -> torch.Tensor:
        """(2B, 77, D): unconditional (negative or empty) contexts first, then the prompts."""
        negative = negative or [""] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        return encode_prompts(self.tokenizer, self.text_encoder, list(negative) + list(prompts))

    def prepare_context(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None,
                        prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None
                        ) -> tuple[torch.Tensor, int]:
        """(2B, ...) text context, unconditional half first, and the batch size B: the prompts encoded, or
        precomputed embeddings (per frame too) with the empty prompt's as their default negative."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            return self.encode_prompt(prompts, negatives), len(prompts)
        negative = negative_prompt_embeds
        if negative is None:
            empty = self.encode_prompt([""])[:1].to(prompt_embeds.device, prompt_embeds.dtype)
            negative = empty.reshape(1, *([1] * (prompt_embeds.ndim - 3)), *empty.shape[1:]).expand_as(prompt_embeds)
        return torch.cat([negative, prompt_embeds]), prompt_embeds.shape[0]

    def prepare_latents(self, batch: int, num_frames: int, height: int, width: int, generator: torch.Generator | None,
                        latents: torch.Tensor | None, init_latents: torch.Tensor | None, init_sigma: float | None
                        ) -> tuple[torch.Tensor, float]:
        """(x at the first noise level, that level): fresh noise times sqrt(1 + sigma_max^2), or with
        `init_latents` (img2img) the clean latents plus `init_sigma` times the noise. Noise is `latents` or a
        CPU draw from `generator` (the same videos on any device)."""
        factor = scale_factor(self.vae)
        shape = (batch, num_frames, self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        device = self._execution_device
        if init_latents is None:
            sigma_max = self.scheduler.config.sigma_max
            return latents.to(device, torch.float32) * initial_noise_scale(sigma_max), sigma_max
        if tuple(init_latents.shape) != shape:
            raise ValueError(f"init_latents must have shape {shape}, got {tuple(init_latents.shape)}")
        sigma_max = float(init_sigma)
        return init_latents.to(device, torch.float32) + sigma_max * latents.to(device, torch.float32), sigma_max

    # --- call -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | tuple[float, float] = DEFAULT_TEXT_GUIDANCE,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        decode_chunk_size: int = 8,
        output_type: str = "np",
        progress: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        init_latents: torch.Tensor | None = None,
        init_sigma: float | None = None,
    ) -> TextToVideoOutput:
        """Generate videos. `guidance_scale`: a float (constant CFG; default 7, the paper's UCF-101 setting) or
        (min, max) rising linearly over frames (SVD's image-to-video recipe). `fps` is the frame rate the video
        should have; the model sees fps - 1 (`model.conditioning.micro_conditioning`, SVD's convention).
        `output_type`: 'np' (uint8), 'pt' ([-1, 1]), 'latent'.

        `prompt_embeds` replaces `prompt` with precomputed text embeddings, (B, 77, D) or per frame
        (B, T, 77, D), so walks can interpolate them; `negative_prompt_embeds` (same shape) defaults to the
        empty prompt's. `init_latents` (B, T, C, h, w) with `init_sigma`: img2img, i.e. the clean latents
        re-noised to `init_sigma` with `latents` (or fresh) noise, then Euler from `init_sigma` to 0."""
        # 1. inputs: defaults from the U-Net's config (per-frame embeddings give the frame count)
        per_frame = prompt_embeds is not None and prompt_embeds.ndim == 4
        num_frames = num_frames or (prompt_embeds.shape[1] if per_frame else self.unet.config.num_frames)
        factor = scale_factor(self.vae)
        height = height or self.unet.config.sample_size * factor
        width = width or self.unet.config.sample_size * factor
        self.check_inputs(prompt, prompt_embeds, negative_prompt_embeds, height, width, num_frames, output_type,
                          init_latents, init_sigma)
        device, dtype = self._execution_device, self.unet.dtype

        # 2. text conditioning (unconditional half first) and micro-conditioning
        context, batch = self.prepare_context(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        context = context.to(device, dtype)
        ids = micro_conditioning(fps, motion_bucket_id, noise_aug_strength, batch_size=2 * batch, device=device,
                                 dtype=dtype)

        # 3. initial latents: the generator's only draw
        x, sigma_max = self.prepare_latents(batch, num_frames, height, width, generator, latents, init_latents,
                                            init_sigma)

        # 4. denoise: EDM preconditioning around the U-Net, frame-wise guidance, Euler on the Karras schedule
        def network(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            return self.unet(x_in.to(dtype), c_noise.to(dtype), encoder_hidden_states=context,
                             added_time_ids=ids).sample.float()

        def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.preconditioning.denoise(network, x_t, sigma)

        if isinstance(guidance_scale, int | float):
            scales = torch.full((num_frames,), float(guidance_scale))
        else:
            scales = linear_guidance_scales(num_frames, *guidance_scale)
        guided = ClassifierFreeGuidance(denoiser, scales)
        sigmas = karras_sigmas(num_inference_steps, self.scheduler.config.sigma_min, sigma_max).to(device)
        x = sample_euler(guided, x, sigmas, disable=not progress)
        self.maybe_free_model_hooks()

        # 5. decode
        return TextToVideoOutput(frames=decode_output(self.vae, x, decode_chunk_size, output_type))


class NonFiniteOutputError(RequestError):
    """Sampling or decoding produced NaN or infinite values (damaged weights, an overflowing dtype): an error
    instead of a black video."""


def check_finite_output(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteOutputError(f"the {what} hold {bad:,} NaN or infinite values of {values.numel():,}: the "
                                   "weights are damaged or the dtype overflows (try --dtype float32)")


def decode_output(vae, latents: torch.Tensor, decode_chunk_size: int, output_type: str) -> np.ndarray | torch.Tensor:
    """What a video pipeline returns for its final latents (B, T, C, h, w): 'latent' as they are, 'pt' the decoded
    frames in [-1, 1] (B, T, 3, H, W), 'np' uint8 (B, T, H, W, 3) rounded as diffusers' image output is."""
    check_finite_output(latents, "latents")
    if output_type == "latent":
        return latents
    frames = decode_latents(vae, latents.to(vae.dtype), chunk_size=decode_chunk_size).float()
    check_finite_output(frames, "decoded frames")
    if output_type == "pt":
        return frames
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()

