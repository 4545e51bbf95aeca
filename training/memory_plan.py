"""Peak GPU memory of a training stage per worker, predicted on a CPU without weights (`lvd train --plan`).

The U-Net of the run is built at its real size under torch's `FakeTensorMode` (tensors with shapes, dtypes
and storages but no data) and goes through one training micro-batch, forward and backward, the way
`StageTrainer.per_sample_loss` runs it: the trainable set (frozen weights get no gradients and their layers
save less for backward), LoRA adapters, gradient checkpointing and autocast as the run would use them.
`LiveMemory`, a `TorchDispatchMode`, counts the bytes of every storage that the pass allocates while it is
alive, and so measures the peak of activations, temporaries, autocast's bf16 weight copies and gradients.
Two things differ from CUDA and are corrected: the pass runs on CPU tensors, where autocast keeps group and
layer norms in bf16 (CUDA autocast runs them in float32: `norms_in_float32` casts their inputs the same way),
and it runs at micro-batch 1, scaled linearly to the real micro-batch (activations are per sample). The frozen
VAE's encoding of the clip (float32, no grad, 16 frames at a time) is measured the same way.

What is counted rather than measured (per worker, bytes):

- U-Net weights: float32, 4 B/parameter (FSDP: / workers, plus two all-gathered blocks in flight);
- gradients: float32 for the trained parameters (FSDP: / workers); with gradient accumulation all of them
  are live while the next micro-batch runs, else as many as were live at the measured peak;
- optimizer state: AdamW 2 x 4 B per trained parameter; 8-bit AdamW 2 x 1 B (+ 4 B per 256-value block);
  the optimizer step adds float32 temporaries of one state's size (torch's foreach AdamW);
- EMA: a float32 copy of every U-Net parameter on rank 0 (FSDP: every rank, its shard);
- frozen models: the VAE and the image (or text) encoder, float32, on every worker.

Not counted: the CUDA context (~0.5 GB, not part of `torch.cuda.max_memory_allocated`), allocator
fragmentation (`memory_reserved` runs above allocated), NCCL buffers, the data loader. Nothing here has been
checked on a GPU yet: benchmarks/memory_plan_gpu.py measures the same configurations side by side.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024**3
GPU_SIZES_GB = (24, 48, 80)
VAE_ENCODE_CHUNK = 16  # StageTrainer encodes 16 frames at a time
TEXT_TOKENS = 77

# Published architectures of SVD's frozen parts (diffusers configs of stabilityai/stable-video-diffusion-img2vid
# and SD 2.x's OpenCLIP ViT-H text encoder), used when the init folder is not on this machine.
SVD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768)
CLIP_VIT_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         image_size=224, patch_size=14, projection_dim=1024)
OPENCLIP_VIT_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           max_position_embeddings=77, vocab_size=49408, projection_dim=1024)


class LiveMemory(TorchDispatchMode):
    """Bytes of the storages that ops allocate inside this mode, while they live; the peak, and how many of
    those bytes were parameter gradients (tensors that became `.grad`) at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.grads = self.grads_at_peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        if self.live > self.peak:
            self.peak, self.grads_at_peak = self.live, self.grads
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        known = self._seen.get(key)
        if known is not None and known() is storage:
            return
        size = storage.nbytes()
        self.live += size
        self._seen[key] = weakref.ref(storage, functools.partial(self._free, key, size))

    def _free(self, key: int, size: int, _ref: weakref.ref) -> None:
        self.live -= size
        if self._seen.get(key) is _ref:
            del self._seen[key]

    def count_gradient(self, parameter: torch.Tensor) -> None:
        """A post-accumulate-grad hook: `parameter.grad`'s bytes are gradients from now on."""
        self.grads += parameter.grad.untyped_storage().nbytes()


def norms_in_float32(model: torch.nn.Module) -> None:
    """Group and layer norms of `model` in float32 under autocast, as CUDA's autocast runs them (CPU autocast
    keeps them in bf16): their float32 inputs and outputs are what the backward saves on a GPU."""
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            module.forward = functools.partial(_float32_forward, type(module).forward, module)


def _float32_forward(forward, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled("cpu"):
        return forward(module, x)
    with torch.autocast("cpu", enabled=False):
        return forward(module, x.float())


@dataclass(frozen=True)
class UNetPass:
    """What one forward + backward of the U-Net at micro-batch 1 holds at its peak (bytes), and its sizes."""

    peak: int  # everything the pass allocated and still held at its peak
    gradients_at_peak: int  # of which parameter gradients
    gradients: int  # parameter gradients at the end of the backward
    parameters: int  # U-Net parameters (with LoRA adapters)
    trainable: int  # parameters that train
    largest_block: int  # parameters of the largest down/mid/up block (an FSDP unit)


def _to_fake_cpu(module: torch.nn.Module, fake_mode) -> None:
    """Replace every meta parameter and buffer of `module` by a fake CPU tensor of `fake_mode`."""
    from torch._subclasses.fake_tensor import FakeTensor

    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                fake = FakeTensor(fake_mode, parameter.data.to("meta"), torch.device("cpu"))
                submodule._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = FakeTensor(fake_mode, buffer.to("meta"), torch.device("cpu"))


def _frozen_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def measure_unet_pass(config_json: str, frames: int, height: int, width: int, trainable: str, lora_rank: int,
                      checkpointing: bool, bf16: bool, image_only: bool, context_tokens: int) -> UNetPass:
    """One fake forward + backward of the U-Net built from `config_json` (a VideoUNet config) at micro-batch 1.
    Cached: the plan asks for the same pass more than once."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.unet import VideoUNet
    from training.trainable import add_lora

    config = json.loads(config_json)
    with torch.device("meta"):  # built (and LoRA'd) on meta, then made fake CPU tensors: nothing is allocated
        unet = VideoUNet(**{**config, "num_frames": frames})
        if trainable == "lora":
            add_lora(unet, lora_rank, float(lora_rank))
    fake_mode = FakeTensorMode()
    _to_fake_cpu(unet, fake_mode)
    with fake_mode:
        return unet_step_memory(unet, frames, height, width, trainable, checkpointing, bf16, image_only,
                                context_tokens)


def unet_step_memory(unet: torch.nn.Module, frames: int, height: int, width: int, trainable: str,
                     checkpointing: bool, bf16: bool, image_only: bool, context_tokens: int) -> UNetPass:
    """The training step's U-Net forward (EDM loss, as `StageTrainer.per_sample_loss` computes it) and backward
    on `unet` at micro-batch 1, under LiveMemory: fake tensors for the plan, real ones to check the plan."""
    from model.edm import EDMLoss, LogNormalNoise, VPredictionPreconditioning
    from training.stages import Phase
    from training.trainable import trainable_names

    config = unet.config
    norms_in_float32(unet)
    phase = Phase("plan", height, width, frames, 1, 1, 1e-4, 0.0, 1.0, trainable=trainable, image_only=image_only)
    chosen = trainable_names([n for n, _ in unet.named_parameters()], phase)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in chosen)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    latent_h, latent_w = height // 8, width // 8
    noisy_channels = config.out_channels
    extra_channels = config.in_channels - noisy_channels  # image mode: the conditioning latent
    latents = torch.randn(1, frames, noisy_channels, latent_h, latent_w)
    condition = torch.randn(1, frames, extra_channels, latent_h, latent_w) if extra_channels else None
    context = torch.randn(1, context_tokens, config.cross_attention_dim)
    added_time_ids = torch.randn(1, 3)
    image_only_indicator = torch.full((1, frames), float(image_only))
    loss_fn = EDMLoss(VPredictionPreconditioning(sigma_data=1.0), LogNormalNoise())

    def network(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([x, condition], dim=2) if condition is not None else x
        return unet(model_input, c_noise, encoder_hidden_states=context, added_time_ids=added_time_ids,
                    image_only_indicator=image_only_indicator).sample.float()

    memory = LiveMemory()
    trained = [p for p in unet.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(memory.count_gradient) for p in trained]
    try:
        with memory:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(network, latents, sigma=torch.ones(1), noise=torch.randn_like(latents)).sum()
            loss.backward()
            del loss
    finally:
        for hook in hooks:
            hook.remove()
    return UNetPass(peak=memory.peak, gradients_at_peak=memory.grads_at_peak, gradients=memory.grads,
                    parameters=sum(p.numel() for p in unet.parameters()),
                    trainable=sum(p.numel() for p in trained), largest_block=largest)


@functools.lru_cache(maxsize=8)
def measure_vae_encode(vae_json: str, frames: int, height: int, width: int) -> int:
    """Peak bytes of the frozen VAE encoding `frames` frames (float32, no grad, VAE_ENCODE_CHUNK at a time)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vae = AutoencoderKLTemporalDecoder(**json.loads(vae_json)).eval()
        frames_in = torch.randn(min(frames, VAE_ENCODE_CHUNK), 3, height, width)
        memory = LiveMemory()
        with memory, torch.no_grad():
            vae.encode(frames_in).latent_dist.mode()
        return memory.peak


def _count_on_meta(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@functools.lru_cache(maxsize=8)
def frozen_parameter_count(conditioning: str, vae_json: str, encoder_json: str) -> int:
    """Parameters of the VAE and the image (or text) encoder, counted on the meta device."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    vae = _count_on_meta(lambda: AutoencoderKLTemporalDecoder(**json.loads(vae_json)))
    encoder_config = json.loads(encoder_json)
    if conditioning == "image":
        encoder = _count_on_meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config)))
    else:
        encoder = _count_on_meta(lambda: CLIPTextModel(CLIPTextConfig(**encoder_config)))
    return vae + encoder


# ------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class TrainingSetup:
    """What decides the memory of one worker: the step's shape and the run's memory settings."""

    frames: int
    height: int
    width: int
    micro_batch: int
    accumulation: int  # micro-batches per optimizer step on a worker
    trainable: str
    lora_rank: int
    checkpointing: bool
    bf16: bool
    optimizer: str
    ema: bool
    fsdp_workers: int  # 1 = weights, gradients and optimizer state replicated (DDP or one worker)
    image_only: bool = False

    def describe(self) -> str:
        parts = [f"micro-batch {self.micro_batch}", f"trainable {self.trainable}"
                 + (f" (rank {self.lora_rank})" if self.trainable == "lora" else ""),
                 "checkpointing" if self.checkpointing else "no checkpointing", "bf16" if self.bf16 else "fp32",
                 self.optimizer]
        if self.fsdp_workers > 1:
            parts.append(f"FSDP x{self.fsdp_workers}")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one worker, by part. `peak` = the static parts + the largest of the three
    moments of a step: the U-Net's forward/backward, the VAE encoding, the optimizer step."""

    setup: TrainingSetup
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer_state: int
    ema: int
    frozen_models: int
    unet_pass: int  # activations, temporaries, bf16 weight copies and gradients live at the pass's peak
    vae_encode: int
    optimizer_step: int  # gradients + the optimizer's temporaries
    peak: int

    def fits(self) -> list[int]:
        """Which of the GPU_SIZES_GB this fits (GB = 1e9 bytes as GPUs are sold; 80 GB ~ 74.5 GiB usable)."""
        return [size for size in GPU_SIZES_GB if self.peak <= size * 1e9 * 0.97]

    def parts(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimizer_state", "ema", "frozen_models", "unet_pass", "vae_encode",
                 "optimizer_step", "peak")
        return {name: getattr(self, name) / GIB for name in names}


def estimate(unet_config: dict[str, Any], setup: TrainingSetup, vae_config: dict[str, Any],
             encoder_config: dict[str, Any], conditioning: str) -> MemoryEstimate:
    """The predicted peak of one worker for `setup` (see the module docstring for what is counted how)."""
    context_tokens = 1 if conditioning == "image" else TEXT_TOKENS
    architecture_only = {k: v for k, v in unet_config.items() if k != "num_frames"}  # the pass sets the frames
    measured = measure_unet_pass(_frozen_key(architecture_only), setup.frames, setup.height, setup.width,
                                 setup.trainable, setup.lora_rank, setup.checkpointing, setup.bf16,
                                 setup.image_only, context_tokens)
    shards = setup.fsdp_workers
    weights = 4 * measured.parameters // shards
    if shards > 1:
        weights += 2 * 4 * measured.largest_block  # the all-gathered block and the next one, prefetched
    gradients = 4 * measured.trainable // shards
    if setup.optimizer == "adamw8bit":
        optimizer_state = 2 * measured.trainable + 2 * 4 * measured.trainable // 256
        step_temporaries = 0  # bitsandbytes updates in place
    else:
        optimizer_state = 8 * measured.trainable // shards
        step_temporaries = 4 * measured.trainable // shards
    ema = 4 * measured.parameters // shards if setup.ema else 0
    frozen = 4 * frozen_parameter_count(conditioning, _frozen_key(vae_config), _frozen_key(encoder_config))
    # The pass at micro-batch 1 held activations (scaled with the micro-batch) and some gradients.
    per_sample = measured.peak - measured.gradients_at_peak
    live_gradients = gradients if setup.accumulation > 1 else measured.gradients_at_peak // shards
    unet_pass = setup.micro_batch * per_sample + live_gradients
    vae_encode = measure_vae_encode(_frozen_key(vae_config), setup.frames, setup.height, setup.width)
    vae_encode += gradients if setup.accumulation > 1 else 0
    optimizer_step = gradients + step_temporaries
    static = weights + optimizer_state + ema + frozen
    return MemoryEstimate(setup=setup, parameters=measured.parameters, trainable=measured.trainable,
                          weights=weights, gradients=gradients, optimizer_state=optimizer_state, ema=ema,
                          frozen_models=frozen, unet_pass=unet_pass, vae_encode=vae_encode,
                          optimizer_step=optimizer_step, peak=static + max(unet_pass, vae_encode, optimizer_step))


def alternatives(unet_config: dict[str, Any], setup: TrainingSetup, vae_config: dict[str, Any],
                 encoder_config: dict[str, Any], conditioning: str, per_worker_batch: int
                 ) -> list[tuple[str, MemoryEstimate]]:
    """What to change when `setup` does not fit 80 GB, one change at a time and then combined, in the order of
    what they cost the recipe: a smaller micro-batch (same result, slower), checkpointing (slower), FSDP
    (more workers), 8-bit AdamW, then training less (temporal layers, LoRA)."""
    steps: list[tuple[str, TrainingSetup]] = []
    current = setup
    if current.micro_batch > 1:
        current = replace(current, micro_batch=1, accumulation=per_worker_batch)
        steps.append(("--micro-batch-size 1", current))
    if not current.checkpointing:
        current = replace(current, checkpointing=True)
        steps.append(("--gradient-checkpointing", current))
    for workers in (2, 4, 8):
        if current.fsdp_workers < workers:
            steps.append((f"--strategy fsdp --num-workers {workers}", replace(current, fsdp_workers=workers)))
    if current.optimizer == "adamw":
        steps.append(("--optimizer adamw8bit", replace(current, optimizer="adamw8bit", fsdp_workers=1)))
    for trainable in ("temporal", "lora"):
        if current.trainable != trainable and not (trainable == "temporal" and current.image_only):
            steps.append((f"--trainable {trainable}", replace(current, trainable=trainable)))
    return [(change, estimate(unet_config, option, vae_config, encoder_config, conditioning))
            for change, option in steps]


# ------------------------------------------------------------------------------- the plan of a request


@dataclass(frozen=True)
class Architecture:
    """The models of a run, as constructor configs: the U-Net (VideoUNet), the VAE and the frozen encoder."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    encoder: dict[str, Any]
    source: str  # where the configs came from


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError):
        return None


def _unet_arguments(config: dict[str, Any]) -> dict[str, Any]:
    import inspect

    from model.unet import VideoUNet

    known = set(inspect.signature(VideoUNet.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in known}


def architecture(preset: str, conditioning: str, init: str | None) -> Architecture:
    """The configs of `init` when it is a pipeline folder on this machine (no weights are read), the tiny
    models' for the tiny preset, else the published SVD architecture (the U-Net at the `svd` preset's size)."""
    from model.unet import PRESETS

    image = conditioning == "image"
    folder = Path(init) if init and (Path(init) / "model_index.json").is_file() else None
    unet = _read_config(folder / "unet" / "config.json") if folder else None
    if unet is not None:
        encoder_dir = "image_encoder" if image else "text_encoder"
        vae = _read_config(folder / "vae" / "config.json") or SVD_VAE
        encoder = _read_config(folder / encoder_dir / "config.json") or (CLIP_VIT_H_VISION if image
                                                                          else OPENCLIP_VIT_H_TEXT)
        unet = _unet_arguments(unet)
        if image and unet.get("in_channels") == 4:  # a text-to-video export, inflated for image conditioning
            unet["in_channels"] = 8
        return Architecture(unet, _vae_arguments(vae), encoder, f"{folder} (configs only)")
    if preset == "tiny":
        from model.loading import load_initial_pipeline

        pipe = load_initial_pipeline("tiny", 0, conditioning, "tiny" if image else None)
        encoder = pipe.image_encoder if image else pipe.text_encoder
        return Architecture(_unet_arguments(dict(pipe.unet.config)), _vae_arguments(dict(pipe.vae.config)),
                            encoder.config.to_dict(), "the tiny preset's models")
    unet = {**PRESETS["svd"], "in_channels": 8 if image else 4}
    return Architecture(unet, SVD_VAE, CLIP_VIT_H_VISION if image else OPENCLIP_VIT_H_TEXT,
                        "the published SVD architecture (U-Net 320/640/1280/1280, CLIP ViT-H)")


def _vae_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The encoder-side settings, as AutoencoderKLTemporalDecoder takes them (the encoder is SD's in both)."""
    keys = ("in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block",
            "latent_channels", "sample_size")
    return {k: config[k] for k in keys if k in config}


def _setup_for(phase, stage_preset, request) -> tuple[TrainingSetup, int]:
    per_worker = phase.batch_size // request.num_workers
    micro = min(request.micro_batch_size or max(p.batch_size for p in stage_preset.phases), per_worker)
    setup = TrainingSetup(
        frames=phase.num_frames, height=phase.height, width=phase.width, micro_batch=micro,
        accumulation=per_worker // micro, trainable=phase.trainable, lora_rank=stage_preset.lora_rank,
        checkpointing=stage_preset.gradient_checkpointing, bf16=stage_preset.precision != "fp32",
        optimizer=stage_preset.optimizer, ema=stage_preset.ema_decay is not None,
        fsdp_workers=request.num_workers if request.strategy == "fsdp" else 1, image_only=phase.image_only)
    return setup, per_worker


def plan_stage(request) -> dict[str, Any]:
    """The resolved stage of `request` (a StageRunRequest, resolved by `stage_preset()` as the trainer's is)
    and the predicted peak GPU memory per worker of each phase; what to change when it does not fit 80 GB."""
    from training.request import default_init

    stage_preset = request.stage_preset()
    init = request.init
    if init is None:
        try:
            init = default_init(request.stage, request.preset, request.output_root)
        except FileNotFoundError:
            init = None
    arch = architecture(request.preset, request.conditioning, init)
    phases, worst = [], None
    for phase in stage_preset.phases:
        setup, per_worker = _setup_for(phase, stage_preset, request)
        result = estimate(arch.unet, setup, arch.vae, arch.encoder, request.conditioning)
        phases.append({"name": phase.name, "height": phase.height, "width": phase.width, "frames": phase.num_frames,
                       "steps": phase.iterations, "global_batch": phase.batch_size, "per_worker_batch": per_worker,
                       "micro_batch": setup.micro_batch, "accumulation": setup.accumulation,
                       "learning_rate": phase.learning_rate, "noise": [phase.p_mean, phase.p_std],
                       "trainable": phase.trainable, "image_only": phase.image_only,
                       "parameters": result.parameters, "trainable_parameters": result.trainable,
                       "memory_gib": result.parts(), "fits_gb": result.fits()})
        if worst is None or result.peak > worst[0].peak:
            worst = (result, per_worker)
    changes = []
    if 80 not in worst[0].fits():
        for change, option in alternatives(arch.unet, worst[0].setup, arch.vae, arch.encoder, request.conditioning,
                                           worst[1]):
            changes.append({"change": change, "setup": option.setup.describe(), "peak_gib": option.peak / GIB,
                            "fits_gb": option.fits()})
    plan = {"stage": request.stage, "preset": request.preset, "conditioning": request.conditioning,
            "init": init, "architecture": arch.source, "steps": stage_preset.total_steps,
            "num_workers": request.num_workers, "strategy": request.strategy,
            "ema_decay": stage_preset.ema_decay, "precision": "bf16 autocast" if worst[0].setup.bf16 else "fp32",
            "optimizer": stage_preset.optimizer, "gradient_checkpointing": stage_preset.gradient_checkpointing,
            "lora": {"rank": stage_preset.lora_rank, "alpha": stage_preset.lora_alpha}
            if any(p.trainable == "lora" for p in stage_preset.phases) else None,
            "phases": phases, "peak_gib": worst[0].peak / GIB, "fits_gb": worst[0].fits(), "changes": changes}
    return {**plan, "text": format_plan(plan)}


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as `lvd train --plan` prints it."""
    lines = [f"stage {plan['stage']} ({plan['preset']}, {plan['conditioning']}-to-video): {plan['steps']} optimizer "
             f"steps on {plan['num_workers']} worker(s), strategy {plan['strategy']}",
             f"init: {plan['init'] or '(previous stage, not there yet)'}; architecture from {plan['architecture']}",
             f"EMA: {'decay ' + str(plan['ema_decay']) if plan['ema_decay'] else 'none'}; precision on a GPU: "
             f"{plan['precision']}; optimizer {plan['optimizer']}; gradient checkpointing "
             f"{'on' if plan['gradient_checkpointing'] else 'off'}"
             + (f"; LoRA rank {plan['lora']['rank']}, alpha {plan['lora']['alpha']}" if plan["lora"] else ""), ""]
    for phase in plan["phases"]:
        lines.append(f"phase {phase['name']}: {phase['height']}x{phase['width']}, {phase['frames']} frame(s), "
                     f"{phase['steps']} steps, global batch {phase['global_batch']} = {plan['num_workers']} x "
                     f"{phase['per_worker_batch']} per worker = micro-batch {phase['micro_batch']} x "
                     f"{phase['accumulation']} accumulated, lr {phase['learning_rate']:g}, noise (P_mean, P_std) = "
                     f"({phase['noise'][0]:g}, {phase['noise'][1]:g}), trainable {phase['trainable']}: "
                     f"{phase['trainable_parameters']:,} of {phase['parameters']:,} parameters")
    lines += ["", "peak GPU memory per worker, GiB (predicted on the CPU; not yet checked on a GPU):",
              "| phase | weights | grads | optimizer | EMA | frozen models | U-Net fwd+bwd | VAE encode | optimizer "
              "step | peak | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for phase in plan["phases"]:
        memory = phase["memory_gib"]
        cells = " | ".join(f"{memory[k]:.2f}" for k in ("weights", "gradients", "optimizer_state", "ema",
                                                       "frozen_models", "unet_pass", "vae_encode", "optimizer_step",
                                                       "peak"))
        lines.append(f"| {phase['name']} | {cells} | {_fits(phase['fits_gb'])} |")
    lines += ["", f"peak {plan['peak_gib']:.1f} GiB: {_fits(plan['fits_gb'])}"]
    if plan["changes"]:
        lines += ["", "It does not fit 80 GB. What to change (a smaller micro-batch and checkpointing stay on in the "
                  "rows below them; the setup column is the whole resulting setup):",
                  "| change | resulting setup | peak GiB | fits |", "|---|---|---|---|"]
        lines += [f"| {c['change']} | {c['setup']} | {c['peak_gib']:.1f} | {_fits(c['fits_gb'])} |"
                  for c in plan["changes"]]
    return "\n".join(lines)


def _fits(sizes: list[int]) -> str:
    return f"fits {', '.join(f'{s} GB' for s in sizes)}" if sizes else "does not fit 80 GB"
