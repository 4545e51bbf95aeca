"""The three SVD training stages as data (docs/recipe.md §4), and `tiny` copies of them that run on a CPU in minutes.

A stage is a list of phases; a phase fixes what one stretch of optimisation sees: resolution, frames,
batch, learning rate, the training noise distribution (P_mean, P_std), which parameters train, and whether
samples are images (temporal layers bypassed via the image-only flag). Values the paper does not publish
are marked [open] and are our choice. `tiny` keeps every stage's structure (phases, image-only flag,
trainable sets, noise shift, EMA) at 64x64 with few steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dataformat import CAPTION_MIX, check_caption_mix
from training.motion import MotionBuckets

TRAINABLE_SETS = ("all", "time_embedding", "temporal", "lora")  # training/trainable.py says what each holds
PRECISIONS = ("auto", "bf16", "fp32")  # autocast: auto = bf16 on CUDA, float32 on a CPU
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: bitsandbytes, CUDA only
CONDITIONINGS = ("text", "image", "multiview")
ELEVATION_CONDITIONS = ("paper", "motion-bucket")  # model/multiview.py's (kept torch-free here)
EXPORTS = ("ema", "raw")  # the weights a stage exports: its EMA (where it keeps one) or the trained weights
TARGET_LATENTS = ("sample", "mode")  # VAE posterior draw (sgm) or its mean, as the training targets


@dataclass(frozen=True)
class Phase:
    """One stretch of training at fixed settings."""

    name: str
    height: int
    width: int
    num_frames: int  # 1 for image phases
    iterations: int  # optimizer steps
    batch_size: int  # global batch: per-worker batch x workers x accumulation
    learning_rate: float
    p_mean: float
    p_std: float
    trainable: str = "all"
    image_only: bool = False
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_SETS:
            raise ValueError(f"phase {self.name}: trainable must be one of {TRAINABLE_SETS}, got {self.trainable!r}")
        if self.height % 8 or self.width % 8 or min(self.height, self.width) < 8:
            raise ValueError(f"phase {self.name}: resolution must be multiples of 8 (VAE f=8), "
                             f"got {self.height}x{self.width}")
        if self.num_frames < 1 or self.iterations < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"phase {self.name}: frames, iterations, batch size and lr must be positive")
        if self.image_only and self.num_frames != 1:
            raise ValueError(f"phase {self.name}: image phases have one frame")


@dataclass(frozen=True)
class StagePreset:
    """A training stage: its phases in order plus stage-wide settings."""

    stage: int
    preset: str
    phases: tuple[Phase, ...]
    ema_decay: float | None = None
    frame_strides: tuple[int, ...] = (1, 2, 3, 4)  # sampled per clip; fps conditioning = source fps / stride
    text_drop_rate: float = 0.15  # docs/recipe.md §4: text dropped 15% for classifier-free guidance
    caption_mix: dict[str, float] = field(default_factory=lambda: dict(CAPTION_MIX))  # coca/video/llm_summary
    weight_decay: float = 0.01  # [open] AdamW default
    grad_clip_norm: float = 1.0  # [open]
    checkpoint_every: int = 1000  # optimizer steps between checkpoints
    sample_every: int = 5000  # steps between sample videos in TensorBoard
    log_every: int = 10
    gradient_checkpointing: bool = True
    init: str | None = None  # stage I: an SD 2.x checkpoint (path or hub id); later stages: previous stage
    # Image-to-video (conditioning "image"): the sampled clip's first frame conditions the video (CLIP image
    # embedding + VAE latent of the frame after noise augmentation). Per sample ln(aug) ~ N(-3.0, 0.5^2), the
    # paper's (docs/recipe.md §2b); [open] embedding and latent dropped together for 10 % of samples for
    # classifier-free guidance (the paper drops text 15 %; 10 % is the common image-conditioning rate).
    conditioning: str = "text"
    image_drop_rate: float = 0.1
    noise_aug_log_mean: float = -3.0
    noise_aug_log_std: float = 0.5
    # What the stage exports (docs/finetuning.md): "ema" = the EMA with sgm's warm-up where the stage keeps one
    # (ema_decay), else the trained weights; "raw" = the trained weights always.
    export: str = "ema"
    # Sample motion -> motion_bucket_id (training/motion.py): text stages learn buckets from measured motion;
    # image-to-video (finetuning released SVD weights) keeps the released meaning, fixed 127.
    motion: MotionBuckets = field(default_factory=lambda: MotionBuckets("linear"))
    # Target latents: a draw from the VAE posterior as sgm trains (its DiagonalGaussianRegularizer samples), or
    # its mode; the image-to-video conditioning latent is always the mode (docs/recipe.md §2b). `tiny` trains on
    # the mode: its random VAE's posterior is mostly noise (std 1.06 against a mean of magnitude 0.19, measured).
    target_latents: str = "sample"
    # How the trainable parameters train (training/trainable.py): autocast precision, optimizer, LoRA size.
    precision: str = "auto"
    optimizer: str = "adamw"
    lora_rank: int = 16  # [open] a common choice for video LoRA finetunes
    lora_alpha: float = 16.0  # adapter scale = lora_alpha / lora_rank
    camera_embedding: bool = False  # multiview: SV3D-style per-frame camera embeddings (model/multiview.py)
    # multiview: how the elevation reaches the U-Net (model/multiview.py): "paper" a fourth added-time id (App. D.6,
    # add_embedding 768 -> 1024 inputs), "motion-bucket" on the motion bucket id (SVD's architecture unchanged).
    elevation_condition: str = "paper"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS or self.optimizer not in OPTIMIZERS:
            raise ValueError(f"precision must be one of {PRECISIONS} and optimizer one of {OPTIMIZERS}, "
                             f"got {self.precision!r} / {self.optimizer!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha positive, got {self.lora_rank} / "
                             f"{self.lora_alpha}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.export not in EXPORTS:
            raise ValueError(f"export must be one of {EXPORTS}, got {self.export!r}")
        if self.elevation_condition not in ELEVATION_CONDITIONS:
            raise ValueError(f"elevation_condition must be one of {ELEVATION_CONDITIONS}, got "
                             f"{self.elevation_condition!r}")
        if self.target_latents not in TARGET_LATENTS:
            raise ValueError(f"target_latents must be one of {TARGET_LATENTS}, got {self.target_latents!r}")
        if not 0.0 <= self.image_drop_rate < 1.0 or self.noise_aug_log_std <= 0:
            raise ValueError("image_drop_rate must be in [0, 1) and noise_aug_log_std positive")
        check_caption_mix(self.caption_mix)

    @property
    def total_steps(self) -> int:
        return sum(phase.iterations for phase in self.phases)

    def phase_at(self, step: int) -> tuple[Phase, int]:
        """The phase that optimizer step `step` (0-based) belongs to, and the step within it."""
        for phase in self.phases:
            if step < phase.iterations:
                return phase, step
            step -= phase.iterations
        raise IndexError("step beyond the stage's last phase")

    def with_max_steps(self, max_steps: int | None) -> StagePreset:
        """Cut the stage to `max_steps` optimizer steps in total, keeping every phase (at least one step each)."""
        if max_steps is None:
            return self
        if max_steps < len(self.phases):
            raise ValueError(f"max_steps={max_steps} is less than the stage's {len(self.phases)} phases")
        total, phases, left = self.total_steps, [], max_steps
        for index, phase in enumerate(self.phases):
            remaining_phases = len(self.phases) - index - 1
            share = max(1, round(max_steps * phase.iterations / total))
            share = min(share, left - remaining_phases)
            phases.append(replace(phase, iterations=share, warmup_steps=min(phase.warmup_steps, share - 1)))
            left -= share
        return replace(self, phases=tuple(phases))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SD21 = "stabilityai/stable-diffusion-2-1"

# docs/recipe.md §4. Stage I batch/lr are not published ([open]); iterations, resolutions, noise and lrs of II/III are.
_SVD_STAGES = {
    1: StagePreset(
        stage=1, preset="svd", init=SD21, frame_strides=(1,),
        phases=(
            Phase("time-embedding", 512, 512, 1, 1_000, 256, 1e-4, -1.2, 1.0, trainable="time_embedding",
                  image_only=True, warmup_steps=100),
            Phase("images-256x384", 256, 384, 1, 30_000, 256, 1e-4, -1.2, 1.0, image_only=True, warmup_steps=500),
        ),
    ),
    2: StagePreset(
        stage=2, preset="svd",
        phases=(
            Phase("video-256x384", 256, 384, 14, 150_000, 1536, 1e-4, -1.2, 1.2, warmup_steps=1000),
            Phase("video-320x576", 320, 576, 14, 100_000, 768, 1e-4, 0.0, 1.2),
        ),
    ),
    3: StagePreset(
        stage=3, preset="svd", ema_decay=0.9999,
        phases=(Phase("finetune-576x1024", 576, 1024, 14, 50_000, 768, 3e-5, 0.5, 1.4, warmup_steps=500),),
    ),
}

# Same structure, 64x64 pixels (8x8 latents), few frames and steps: CPU tests, the demo, CI.
_TINY_STAGES = {
    1: StagePreset(
        stage=1, preset="tiny", target_latents="mode", frame_strides=(1,), checkpoint_every=10, sample_every=20,
        log_every=1, gradient_checkpointing=False,
        phases=(
            Phase("time-embedding", 64, 64, 1, 4, 4, 1e-3, -1.2, 1.0, trainable="time_embedding", image_only=True),
            Phase("images", 64, 64, 1, 16, 4, 1e-3, -1.2, 1.0, image_only=True, warmup_steps=2),
        ),
    ),
    2: StagePreset(
        stage=2, preset="tiny", target_latents="mode", checkpoint_every=10, sample_every=20, log_every=1,
        gradient_checkpointing=False,
        phases=(
            Phase("video-low", 64, 64, 6, 12, 2, 1e-3, -1.2, 1.2, warmup_steps=2),
            Phase("video-high", 64, 96, 6, 8, 2, 1e-3, 0.0, 1.2),
        ),
    ),
    3: StagePreset(
        stage=3, preset="tiny", target_latents="mode", ema_decay=0.9, checkpoint_every=10, sample_every=20, log_every=1,
        gradient_checkpointing=False,
        phases=(Phase("finetune", 96, 128, 6, 12, 2, 3e-4, 0.5, 1.4, warmup_steps=2),),
    ),
}

# SVD-XT (docs/recipe.md §2b): SVD's stages with stage III on 25 frames, the frame count SVD-XT generates. An
# image-to-video stage III takes its frame count from the init U-Net's config anyway (`StageRunRequest.resolve`).
XT_FRAMES = 25
_SVD_XT_STAGES = {
    stage: replace(preset, preset="svd-xt", phases=tuple(
        replace(phase, num_frames=XT_FRAMES) if stage == 3 else phase for phase in preset.phases))
    for stage, preset in _SVD_STAGES.items()
}

STAGE_PRESETS: dict[str, dict[int, StagePreset]] = {"svd": _SVD_STAGES, "svd-xt": _SVD_XT_STAGES, "tiny": _TINY_STAGES}

# What the whole DAG (lvd-pipeline) evaluates and generates after training with a preset: the protocol settings
# a preset overrides in evaluate-fvd's and generate-video's requests (flows/pipeline.py applies them; training/
# cannot see those requests, so these are plain values, and tests/test_pipeline.py checks that every field is a
# setting of the request it lands in). `tiny` is a smoke test that fits a laptop: 4 FVD videos of 16 frames at
# 64x112 (the protocol's 5:9 aspect, rounded to the VAE's factor 8) with 2 sampling steps, and 14-frame videos at
# stage 3's training resolution (96x128). A preset without an entry (`svd`) uses the requests' defaults, i.e.
# the paper's protocol (docs/recipe.md §5: 13,320 videos, 320x576).


@dataclass(frozen=True)
class FvdPreset:
    """A preset's zero-shot FVD run: how many videos, in what batches and shards, how they are sampled."""

    num_videos: int
    batch_size: int
    shard_size: int
    steps: int
    num_frames: int
    height: int
    width: int


@dataclass(frozen=True)
class GeneratePreset:
    """A preset's sample videos: their size and sampling steps."""

    num_frames: int
    height: int
    width: int
    steps: int


FVD_PRESETS: dict[str, FvdPreset] = {
    "tiny": FvdPreset(num_videos=4, batch_size=2, shard_size=4, steps=2, num_frames=16, height=64, width=112),
}
GENERATE_PRESETS: dict[str, GeneratePreset] = {
    "tiny": GeneratePreset(num_frames=14, height=96, width=128, steps=8),
}


# Image-to-video training noise (P_mean, P_std), both from the paper's App. D.4 (docs/recipe.md §4,
# docs/finetuning.md "Noise"): (1.0, 1.6) for the 576x1024 finetunes of SVD and SVD-XT (stage III's default),
# (0.7, 1.6) for its first image-to-video finetune at the base resolution 320x576 (what SVD_Xtend and
# animate-anything use, at 320x512). Text-to-video stage III: (0.5, 1.4).
IMAGE_TO_VIDEO_NOISE: dict[str, tuple[float, float]] = {"576x1024": (1.0, 1.6), "320x576": (0.7, 1.6)}
DEFAULT_IMAGE_TO_VIDEO_NOISE = "576x1024"

# Multi-view finetune (docs/multiview.md): SVD-MV's orbits of 21 views at 576x576, the image-to-video noise; steps,
# batch and learning rate are [open]. The conditioning frame is view 0, so every frame is read at stride 1.
_I2V_NOISE = IMAGE_TO_VIDEO_NOISE[DEFAULT_IMAGE_TO_VIDEO_NOISE]
MULTIVIEW_PHASES = {
    "svd": Phase("multiview-576x576", 576, 576, 21, 12_000, 16, 1e-5, *_I2V_NOISE, warmup_steps=100),
    "tiny": Phase("multiview", 64, 64, 6, 4, 2, 3e-4, *_I2V_NOISE),
}


def get_stage_preset(stage: int, preset: str = "tiny", conditioning: str = "text",
                     image_noise: str = DEFAULT_IMAGE_TO_VIDEO_NOISE) -> StagePreset:
    """The preset for `stage` (1, 2 or 3) and `conditioning` ("text" or "image"); a clear error for anything else.

    Image-to-video trains on clips, so stages 2 and 3 only; stage 3's noise moves up to `image_noise`
    (IMAGE_TO_VIDEO_NOISE), and its motion buckets stay at the released 127."""
    if preset not in STAGE_PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose from {sorted(STAGE_PRESETS)}")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in STAGE_PRESETS[preset]:
        raise ValueError(f"stage must be 1 (image pretraining), 2 (video pretraining) or 3 (high-res finetune), "
                         f"got {stage!r}")
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    chosen = STAGE_PRESETS[preset][stage]
    if conditioning == "text":
        return chosen
    if conditioning == "multiview":
        if stage != 3:
            raise ValueError("the multi-view finetune is stage 3 (it finetunes an image-to-video model)")
        return replace(chosen, phases=(MULTIVIEW_PHASES[preset],), conditioning="multiview", frame_strides=(1,))
    if stage == 1:
        raise ValueError("image-to-video training needs clips: use stage 2 or 3 with conditioning 'image' "
                         "(stage 1 is image pretraining)")
    if image_noise not in IMAGE_TO_VIDEO_NOISE:
        raise ValueError(f"image_noise must be one of {sorted(IMAGE_TO_VIDEO_NOISE)}, got {image_noise!r}")
    phases = chosen.phases
    if stage == 3:
        p_mean, p_std = IMAGE_TO_VIDEO_NOISE[image_noise]
        phases = tuple(replace(phase, p_mean=p_mean, p_std=p_std) for phase in phases)
    return replace(chosen, phases=phases, conditioning="image", motion=MotionBuckets("fixed"))


def with_video_frames(preset: StagePreset, num_frames: int) -> StagePreset:
    """Every video phase of `preset` on `num_frames` frames (image phases keep their one frame)."""
    if num_frames < 2:
        raise ValueError(f"video phases need at least 2 frames, got {num_frames}")
    return replace(preset, phases=tuple(phase if phase.image_only else replace(phase, num_frames=num_frames)
                                        for phase in preset.phases))
