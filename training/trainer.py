"""One optimizer step of SVD training, the same code in a Ray worker, a test or a benchmark.

`StageTrainer` owns the video U-Net (trained), the frozen VAE and text encoder (image-to-video: CLIP image
encoder), AdamW, EMA and the step counter. Per phase it sets which parameters train (image phases also
freeze the temporal layers, so image batches cannot move them, not even by weight decay) and wraps the
U-Net in DDP when there is more than one worker (or shards it with FSDP2, `strategy="fsdp"`: weights,
gradients, AdamW state and EMA split across workers); the loss always calls the *wrapped* model, so
gradients are really synchronised (docs/recipe.md §6: community trainers skipped this). Noise level and
noise are drawn per sample from (seed, global position): a batch's gradient does not depend on how it is
split across workers. In image mode so are the conditioning frame's noise-augmentation strength and noise,
and the guidance dropout.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.conditioning import ImageConditioning, encode_image_conditioning, micro_conditioning
from model.edm import EDMLoss, LogNormalNoise, VPredictionPreconditioning
from model.multiview import added_time_id_count, takes_elevation
from model.text import encode_prompts
from model.vae import encode_frames
from training.stages import Phase, StagePreset
from training.trainable import (
    add_lora,
    autocast_dtype,
    is_lora_parameter,
    make_optimizer,
    merged_state_dict,
    trainable_names,
    uses_lora,
)

__all__ = ["StageTrainer", "trainable_names"]  # trainable_names lives in training/trainable.py

def position_generators(seed: int, stream: int, positions: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per global sample position, seeded by (seed, stream, position): each random stream
    (7 noise level and noise, 11 image augmentation, 13 latent draws) is reproducible per sample."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, position]).generate_state(1)[0]))
            for position in positions.tolist()]


RNG_STATE_FILE = "rng.json"


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and Python RNG states as plain JSON data (a pickle could run code on resume)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def read_rng_state(directory: Path) -> dict[str, Any]:
    """The RNG states of a checkpoint: rng.json, or the tensors-and-arrays-only rng.pt of older checkpoints."""
    if (directory / RNG_STATE_FILE).is_file():
        return json.loads((directory / RNG_STATE_FILE).read_text())
    legacy = load_weights_only(directory / "rng.pt", numpy_arrays=True)
    kind, keys, position, has_gauss, cached_gaussian = legacy["numpy"]
    version, python_state, gauss_next = legacy["python"]
    return {"torch": legacy["torch"].tolist(),
            "numpy": {"kind": kind, "keys": np.asarray(keys).tolist(), "position": position, "has_gauss": has_gauss,
                      "cached_gaussian": cached_gaussian},
            "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def load_weights_only(path: Path, numpy_arrays: bool = False) -> Any:
    """torch.load that unpickles tensors and plain containers only (and numpy arrays when `numpy_arrays`);
    anything else is refused with one line, before any of it runs."""
    allowed = []
    if numpy_arrays:
        from numpy.core.multiarray import _reconstruct

        allowed = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only unpickler met a global outside its allowlist
        raise ValueError(f"{path} holds more than tensors (a pickle that would run code to load it); "
                         "refusing to load it") from None


def augmentation_for_positions(positions: torch.Tensor, frame_shape: tuple[int, ...], seed: int,
                               preset: StagePreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample from (seed, position), like the noise: the conditioning frame's noise-augmentation strength
    (ln aug ~ N(noise_aug_log_mean, noise_aug_log_std^2)), its Gaussian noise, and whether the image
    conditioning is kept (False with probability `image_drop_rate`: embedding and latent dropped together)."""
    strengths, noises, keep = [], [], []
    for generator in position_generators(seed, 11, positions):
        normal = torch.randn((), generator=generator).item()
        strengths.append(math.exp(preset.noise_aug_log_mean + preset.noise_aug_log_std * normal))
        keep.append(torch.rand((), generator=generator).item() >= preset.image_drop_rate)
        noises.append(torch.randn(frame_shape, generator=generator))
    return torch.tensor(strengths), torch.stack(noises), torch.tensor(keep)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (collective under FSDP), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


STRATEGIES = ("ddp", "fsdp")


def ema_decay_at(decay: float, updates: int) -> float:
    """sgm's LitEma warm-up: the decay of the `updates`-th update (1-based) is min(decay, (1 + n) / (10 + n)), so
    an EMA follows the weights early on (0.18 at the first update, 0.9 at the 80th, 0.99 at the 890th) and reaches
    `decay` only after (10 decay - 1) / (1 - decay) updates (89,990 for 0.9999)."""
    return min(decay, (1 + updates) / (10 + updates))


class ExponentialMovingAverage:
    """EMA of the U-Net's weights (stage III: decay 0.9999) with sgm's warm-up (`ema_decay_at`), in float32.

    Without the warm-up an EMA at 0.9999 started from the initial weights still holds 0.9999^n of them after n
    updates (90 % after 1,000), so a short finetune would export mostly its initialisation."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {n: _local(p).detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> float:
        """shadow <- d * shadow + (1 - d) * param with d = ema_decay_at(decay, n), on this rank's shard under FSDP;
        returns d."""
        self.updates += 1
        decay = ema_decay_at(self.decay, self.updates)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        torch._foreach_lerp_([self.shadow[n] for n in names], [_local(params[n]).detach().float() for n in names],
                             1.0 - decay)
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """The shadow weights of a checkpoint and how many updates made them (one per optimizer step)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA checkpoint lacks {sorted(missing)[:3]}")
        self.shadow = {n: state[n].float().clone() for n in self.shadow}
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            param.copy_(self.shadow[name].to(param.dtype))


def relative_change(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], names: list[str]) -> float:
    """||w - w0|| / ||w0|| over the parameters `names` (the ones a stage trains): how far the weights moved."""
    moved = sum((final[n].double() - initial[n].double()).square().sum().item() for n in names)
    size = sum(initial[n].double().square().sum().item() for n in names)
    return math.sqrt(moved / size) if size else 0.0


MOTION_BUCKET_COUNT = 256


class StageTrainer:
    """Holds the model and optimizer state of a stage and performs optimizer steps."""

    def __init__(self, pipeline, preset: StagePreset, seed: int = 0, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, micro_batch_size: int = 1,
                 keep_ema: bool = True, strategy: str = "ddp") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.preset, self.seed = preset, seed
        self.sharded = strategy == "fsdp" and world_size > 1
        self.strategy = "fsdp" if self.sharded else "ddp"  # what the checkpoints' layout follows
        self.device = torch.device(device)
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.unet = pipeline.unet.to(self.device).train()
        self.vae = pipeline.vae.to(self.device).eval().requires_grad_(False)
        self.image_mode = preset.conditioning != "text"  # image-to-video, or its multi-view finetune
        if self.image_mode:  # image-to-video: CLIP image encoder instead of the text encoder
            self.image_encoder = pipeline.image_encoder.to(self.device).eval().requires_grad_(False)
            self.feature_extractor = pipeline.feature_extractor
            if self.unet.config.in_channels != 2 * self.vae.config.latent_channels:
                raise ValueError(f"image-to-video training needs a U-Net with {2 * self.vae.config.latent_channels} "
                                 f"input channels (noisy + conditioning latent), got {self.unet.config.in_channels}")
        else:
            self.text_encoder = pipeline.text_encoder.to(self.device).eval().requires_grad_(False)
            self.tokenizer = pipeline.tokenizer
        # SVD-MV the paper's way: the elevation is the U-Net's fourth added-time id (model/multiview.py)
        self.elevation_id = preset.conditioning == "multiview" and preset.elevation_condition == "paper"
        if self.image_mode and self.elevation_id != takes_elevation(self.unet):
            raise ValueError(f"elevation_condition {preset.elevation_condition!r} needs a U-Net with "
                             f"{4 if self.elevation_id else 3} added-time ids, this one embeds "
                             f"{added_time_id_count(self.unet)} (model.multiview.with_elevation_condition widens "
                             "SVD's)")
        self.lora = uses_lora(preset)
        if self.lora:  # adapters first: FSDP, the optimizer and the EMA see the U-Net as it trains
            add_lora(self.unet, preset.lora_rank, preset.lora_alpha)
        if preset.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.autocast_dtype = autocast_dtype(preset.precision, self.device)
        if self.sharded:  # FSDP2: each U-Net block is one all-gather unit, the root holds the rest
            from torch.distributed.fsdp import fully_shard

            for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
                fully_shard(block)
            fully_shard(self.unet)
            keep_ema = True  # every rank keeps the EMA of its own shard
        self.optimizer = make_optimizer(list(self.unet.parameters()), preset.optimizer, preset.phases[0].learning_rate,
                                        preset.weight_decay, self.device)
        keeps_ema = bool(preset.ema_decay) and preset.export == "ema"
        self.ema = ExponentialMovingAverage(self.unet, preset.ema_decay) if keeps_ema and keep_ema else None
        self.motion_buckets_seen = torch.zeros(MOTION_BUCKET_COUNT, dtype=torch.int64)  # since the last gather
        # One loss per phase: each phase has its own training noise levels (ln sigma ~ N(P_mean, P_std^2)).
        self.losses = {phase.name: EDMLoss(VPredictionPreconditioning(sigma_data=1.0),
                                           LogNormalNoise(phase.p_mean, phase.p_std)) for phase in preset.phases}
        self.step = 0
        self.model: torch.nn.Module = self.unet
        self._configured_phase: str | None = None

    # --- phases -----------------------------------------------------------------------------------
    def configure_phase(self, phase: Phase) -> None:
        """Freeze/unfreeze per the phase and (re)wrap in DDP, which registers hooks for trainable params only."""
        if self._configured_phase == phase.name:
            return
        names = [n for n, _ in self.unet.named_parameters()]
        chosen = trainable_names(names, phase)
        for name, param in self.unet.named_parameters():
            param.requires_grad_(name in chosen)
        if self.world_size > 1 and not self.sharded:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.unet, device_ids=device_ids)
        self._configured_phase = phase.name

    def learning_rate(self, phase: Phase, step_in_phase: int) -> float:
        """Linear warmup at the start of each phase, then constant (the paper's schedule is constant)."""
        if phase.warmup_steps and step_in_phase < phase.warmup_steps:
            return phase.learning_rate * (step_in_phase + 1) / (phase.warmup_steps + 1)
        return phase.learning_rate

    # --- loss --------------------------------------------------------------------------------------
    def target_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clips' latents: the VAE posterior's mode, or (`target_latents="sample"`, as sgm) a draw from it
        with each sample's own generator from (seed, position), so batching does not change the draws."""
        pixels = batch["pixels"].to(self.device)
        with torch.no_grad():
            if self.preset.target_latents == "mode":
                return encode_frames(self.vae, pixels, chunk_size=16).float()
            latents = []
            for index, generator in enumerate(position_generators(self.seed, 13, batch["positions"])):
                latents.append(encode_frames(self.vae, pixels[index:index + 1], chunk_size=16, sample=True,
                                             generator=generator))
            return torch.cat(latents).float()

    def encode_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            context = encode_prompts(self.tokenizer, self.text_encoder, list(batch["captions"])).to(self.device)
        return self.target_latents(batch), context

    def image_conditioning(self, batch: dict[str, Any]) -> tuple[ImageConditioning, torch.Tensor]:
        """The batch's own conditioning: each clip's first frame, augmented with its own strength and noise,
        dropped per sample for guidance; and the micro-conditioning [fps - 1, motion bucket, that strength]."""
        first = batch["pixels"][:, 0].to(self.device)
        strength, noise, keep = augmentation_for_positions(batch["positions"], tuple(first.shape[1:]), self.seed,
                                                           self.preset)
        with torch.no_grad():
            conditioning = encode_image_conditioning(self.image_encoder, self.feature_extractor, self.vae, first,
                                                     strength.to(self.device), noise.to(self.device))
        elevation = batch["elevation"] if self.elevation_id else None  # SVD-MV the paper's way: a fourth id
        ids = micro_conditioning(batch["fps"], batch["motion_bucket"], strength, device=self.device,
                                 elevation=elevation)
        return conditioning.dropped(keep), ids

    def per_sample_loss(self, batch: dict[str, Any], phase: Phase, sigma: float | None = None) -> torch.Tensor:
        """EDM loss per sample; `sigma` fixes the noise level (validation) instead of drawing it."""
        if self.image_mode:
            latents = self.target_latents(batch)
            conditioning, added_time_ids = self.image_conditioning(batch)
            context = conditioning.embedding.float()
        else:
            latents, context = self.encode_batch(batch)
            conditioning = None
            added_time_ids = micro_conditioning(batch["fps"], batch["motion_bucket"], 0.0,
                                                batch_size=latents.shape[0], device=self.device)
        batch_size, frames = latents.shape[:2]
        fixed_sigma = None if sigma is None else torch.full((batch_size,), float(sigma), device=self.device)
        image_only = torch.full((batch_size, frames), float(phase.image_only), device=self.device)
        camera = {"camera": batch["camera"].to(self.device)} if self.preset.camera_embedding else {}

        def network(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            model_input = conditioning.model_input(x) if conditioning is not None else x
            return self.model(model_input, c_noise, encoder_hidden_states=context, added_time_ids=added_time_ids,
                              image_only_indicator=image_only, **camera).sample.float()

        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            # sigma and noise per sample from (seed, position): the same draws however the batch is split
            generators = position_generators(self.seed, 7, batch["positions"])
            return self.losses[phase.name](network, latents, generator=generators, sigma=fixed_sigma)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over this worker's micro-batches of the step (gradient accumulation)."""
        step = micro_batches[0]["step"]
        if step != self.step:
            raise RuntimeError(f"data is at step {step} but the trainer at step {self.step}")
        phase, within = self.preset.phase_at(step)
        self.configure_phase(phase)
        lr = self.learning_rate(phase, within)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        share = sum(len(b["captions"]) for b in micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            if self.sharded:
                self.unet.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
            with sync:
                losses = self.per_sample_loss(batch, phase)
                (losses.sum() / share).backward()
            loss_sum += losses.detach().sum().item()
            self.motion_buckets_seen += torch.bincount(batch["motion_bucket"].long().clamp(0, MOTION_BUCKET_COUNT - 1),
                                                       minlength=MOTION_BUCKET_COUNT)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, self.preset.grad_clip_norm)).item()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step}; check the data and learning rate")
        self.optimizer.step()
        ema_decay = self.ema.update(self.unet) if self.ema is not None else None
        self.step += 1
        mean_loss = torch.tensor([loss_sum, float(share)])
        if self.world_size > 1:
            torch.distributed.all_reduce(mean_loss)
        return {"step": self.step, "loss": (mean_loss[0] / mean_loss[1]).item(), "lr": lr, "grad_norm": grad_norm,
                "phase": phase.name, "samples": int(mean_loss[1].item()),
                **({"ema_decay": ema_decay} if ema_decay is not None else {})}

    def gather_motion_buckets(self) -> list[int]:
        """The motion buckets trained on so far, counted over every worker (collective: every rank calls it);
        rank 0 keeps the total, the others start counting afresh, so the next gather adds only new samples."""
        counts = self.motion_buckets_seen
        if self.world_size > 1:
            counts = counts.to(self.device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        self.motion_buckets_seen = counts if self.rank == 0 else torch.zeros_like(counts)
        return counts.tolist()

    # --- state -------------------------------------------------------------------------------------
    def gather_state(self, for_export: bool = False) -> dict[str, Any] | None:
        """Full weights, EMA and optimizer state on rank 0 (None elsewhere). Collective under FSDP:
        every rank must call it. `for_export` gathers only what an export writes (the EMA when the stage
        keeps one, else the weights): a sample video does not need the optimizer state, twice the model."""
        with_weights = not for_export or self.ema is None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.unet, options=options) if with_weights else None
            optimizer = None if for_export else get_optimizer_state_dict(self.unet, self.optimizer, options=options)
            ema = self._gather_ema()
            return {"unet": weights, "optimizer": optimizer, "ema": ema} if self.rank == 0 else None
        if self.rank != 0:
            return None
        weights = {k: v.detach().cpu() for k, v in self.unet.state_dict().items()} if with_weights else None
        return {"unet": weights, "optimizer": None if for_export else self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None}

    def _gather_ema(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        from torch.distributed.tensor import DTensor

        full = {}
        for name, param in self.unet.named_parameters():
            shard = self.ema.shadow[name]
            if isinstance(param, DTensor):
                shard = DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape,
                                           stride=param.stride()).full_tensor()
            full[name] = shard.cpu()
        return full

    def save_state(self, directory: Path, extra: dict[str, Any] | None = None,
                   gathered: dict[str, Any] | None = None) -> None:
        """Weights (safetensors), EMA, optimizer, step, RNG and data position into `directory` (rank 0)."""
        gathered = gathered or self.gather_state()
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in gathered["unet"].items()}, directory / "unet.safetensors")
        if gathered["ema"] is not None:
            save_file({k: v.contiguous() for k, v in gathered["ema"].items()}, directory / "ema.safetensors")
        torch.save(gathered["optimizer"], directory / "optimizer.pt")
        (directory / RNG_STATE_FILE).write_text(json.dumps(rng_state()))
        state = {"step": self.step, "stage": self.preset.stage, "preset": self.preset.preset, "seed": self.seed,
                 "data_position": self.data_position(), "strategy": self.strategy,
                 "motion_buckets_seen": self.motion_buckets_seen.tolist(), **(extra or {})}
        (directory / "state.json").write_text(json.dumps(state, indent=2))

    def load_state(self, directory: Path) -> dict[str, Any]:
        """Every rank reads the checkpoint (full tensors) and keeps what it holds."""
        state = json.loads((directory / "state.json").read_text())
        if state["stage"] != self.preset.stage:
            raise ValueError(f"checkpoint {directory} is from stage {state['stage']}, not {self.preset.stage}")
        saved_strategy = state.get("strategy", "ddp")
        if saved_strategy != self.strategy:
            raise ValueError(f"checkpoint {directory} was written with strategy {saved_strategy!r}; "
                             "resume with the same strategy (or restart the stage)")
        rng = read_rng_state(directory)
        weights = load_file(directory / "unet.safetensors")
        optimizer = load_weights_only(directory / "optimizer.pt")
        ema = load_file(directory / "ema.safetensors") if (directory / "ema.safetensors").exists() else None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.unet, weights, options=options)
            set_optimizer_state_dict(self.unet, self.optimizer, optimizer, options=options)
            if self.ema is not None and ema is not None:
                self.ema.load_state_dict({n: self._shard_like(p, ema[n]) for n, p in self.unet.named_parameters()},
                                         updates=int(state["step"]))
        else:
            self.unet.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
            self.optimizer.load_state_dict(optimizer)
            if self.ema is not None and ema is not None:
                self.ema.load_state_dict(ema, updates=int(state["step"]))
        set_rng_state(rng)
        self.step = int(state["step"])
        if self.rank == 0 and "motion_buckets_seen" in state:  # the others count only what they train next
            self.motion_buckets_seen = torch.tensor(state["motion_buckets_seen"], dtype=torch.int64)
        return state

    @staticmethod
    def _shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `full`, laid out like the FSDP parameter `param`."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(param, DTensor):
            return full
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements).to_local()

    def data_position(self) -> int:
        """Global sample position the next step starts reading at."""
        position, left = 0, self.step
        for phase in self.preset.phases:
            taken = min(left, phase.iterations)
            position += taken * phase.batch_size
            left -= taken
        return position

    def export_unet(self, gathered: dict[str, Any] | None = None):
        """A plain U-Net with the weights to export (EMA when the stage keeps one) on rank 0, None elsewhere.
        Collective under FSDP (pass `gathered` from `gather_state` to avoid a second gather)."""
        import copy

        if self.sharded:
            gathered = gathered or self.gather_state(for_export=True)
            if self.rank != 0:
                return None
            from model.unet import VideoUNet

            exported = VideoUNet.from_config(self.unet.config)
            state = gathered["ema"] if gathered["ema"] is not None else gathered["unet"]
            if self.lora:
                state = merged_state_dict(state, self.preset.lora_alpha / self.preset.lora_rank)
            exported.load_state_dict(state)
            return exported.to(self.device)
        if self.ema is None and not self.lora:
            return self.unet
        exported = copy.deepcopy(self.unet)
        if self.ema is not None:
            self.ema.copy_to(exported)
        return self._merged(exported) if self.lora else exported

    def _merged(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The plain U-Net (diffusers' class, no peft layers) with the LoRA adapters folded into its weights."""
        from model.unet import VideoUNet

        plain = VideoUNet.from_config(unet.config)
        plain.load_state_dict(merged_state_dict(unet.state_dict(), self.preset.lora_alpha / self.preset.lora_rank))
        return plain.to(self.device)

    def lora_state(self, gathered: dict[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
        """The adapter weights to export (EMA when kept) on rank 0, None without LoRA or elsewhere; from
        `gathered` (`gather_state`'s, a collective under FSDP) when given."""
        if not self.lora or self.rank != 0:
            return None
        if gathered is not None:
            state = gathered["ema"] if gathered["ema"] is not None else gathered["unet"]
        elif self.ema is not None:
            state = self.ema.state_dict()
        else:
            state = {n: p.detach() for n, p in self.unet.named_parameters()}
        return {n: t for n, t in state.items() if is_lora_parameter(n)}
