"""What trains and how: the trainable sets, LoRA, the autocast precision and the optimizer of a stage.

Trainable sets (a phase's `trainable`, or the request's `trainable` for every phase):

- `all`: every U-Net parameter.
- `time_embedding`: the timestep and micro-conditioning embeddings (stage I's first phase).
- `temporal`: exactly the layers SVD added to the image U-Net. In diffusers' `UNetSpatioTemporalConditionModel`
  every spatial ResBlock became a `SpatioTemporalResBlock` = `spatial_res_block` (SD's) + `temporal_res_block`
  (a `TemporalResnetBlock`, Conv3d (3,1,1)) + `time_mixer` (an `AlphaBlender`, the learned mix factor), and every
  spatial transformer a `TransformerSpatioTemporalModel` = SD's `norm`/`proj_in`/`transformer_blocks`/`proj_out`
  + `temporal_transformer_blocks` (`TemporalBasicTransformerBlock`s) + `time_pos_embed` (the frame-index
  embedding) + `time_mixer`. A parameter is temporal when its name goes through one of those four module names
  (`model.unet.TEMPORAL_MARKERS`); tests/test_trainable.py checks the rule against the module classes.
  The image-to-video conditioning (`conv_in`'s extra channels, `add_embedding`) is not temporal: train `all`
  or `lora` to adapt it.
- `lora`: the base weights stay frozen; peft LoRA adapters (rank `lora_rank`, scale `lora_alpha / lora_rank`)
  on every attention projection, spatial and temporal (`to_q`, `to_k`, `to_v`, `to_out.0`) train.

A LoRA finetune exports the U-Net with the adapters merged (a plain diffusers pipeline folder, loads anywhere)
and, beside it, the adapter alone in peft's format (`pipeline/unet_lora/`): diffusers 0.42's
`UNetSpatioTemporalConditionModel` has no `PeftAdapterMixin` (no `load_lora_adapter`), so the adapter is
applied with peft: `PeftModel.from_pretrained(pipe.unet, "pipeline/unet_lora")`.

Precision: `auto` is bf16 autocast on CUDA and float32 on a CPU; `bf16` asks for bf16 autocast on any
device; `fp32` turns autocast off. Weights, gradients and optimizer state stay float32 in every case.
Optimizer: `adamw` (torch, two float32 states per trained parameter) or `adamw8bit` (bitsandbytes' 8-bit
AdamW, two 1-byte states: CUDA only).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.unet import is_temporal_parameter
from training.stages import OPTIMIZERS, PRECISIONS, Phase, StagePreset

TIME_EMBEDDING_PREFIXES = ("time_embedding.", "add_embedding.", "time_proj.", "add_time_proj.")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_ADAPTER = "default"  # peft's adapter name inside the trained U-Net


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def trainable_names(names: list[str], phase: Phase) -> set[str]:
    """Parameter names that train in `phase` (image phases never train temporal layers)."""
    if phase.trainable == "time_embedding":
        chosen = {n for n in names if n.startswith(TIME_EMBEDDING_PREFIXES)}
    elif phase.trainable == "temporal":
        chosen = {n for n in names if is_temporal_parameter(n)}
    elif phase.trainable == "lora":
        chosen = {n for n in names if is_lora_parameter(n)}
    else:
        chosen = {n for n in names if not is_lora_parameter(n)}
    if phase.image_only:
        chosen = {n for n in chosen if not is_temporal_parameter(n)}
    return chosen


def uses_lora(preset: StagePreset) -> bool:
    return any(phase.trainable == "lora" for phase in preset.phases)


def lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      init_lora_weights=True)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """Insert LoRA adapters into `unet` in place (B starts at zero: the model's output is unchanged)."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(lora_config(rank, alpha), unet, adapter_name=LORA_ADAPTER)


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA'd U-Net's state with every adapter folded into its base weight (W + scaling * B @ A) and peft's
    names undone (`to_q.base_layer.weight` -> `to_q.weight`): the state of the plain U-Net."""
    merged = {}
    for name, tensor in state.items():
        if is_lora_parameter(name):
            continue
        plain = name.replace(".base_layer.", ".")
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            down = state[f"{prefix}.lora_A.{LORA_ADAPTER}.weight"].float()
            up = state[f"{prefix}.lora_B.{LORA_ADAPTER}.weight"].float()
            tensor = (tensor.float() + scaling * (up @ down)).to(tensor.dtype)
        merged[plain] = tensor
    return merged


def save_lora_adapter(state: dict[str, torch.Tensor], rank: int, alpha: float, directory: Path) -> None:
    """The adapter alone in peft's format (adapter_config.json + adapter_model.safetensors), loadable with
    `peft.PeftModel.from_pretrained(unet, directory)` onto the U-Net the finetune started from."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    lora_config(rank, alpha).save_pretrained(str(directory))
    adapter = {"base_model.model." + name.replace(f".{LORA_ADAPTER}.", "."): tensor.detach().cpu().contiguous()
               for name, tensor in state.items() if is_lora_parameter(name)}
    save_file(adapter, directory / "adapter_model.safetensors")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, never silently on a CPU (float32 there unless asked for)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def make_optimizer(params: list[torch.nn.Parameter], name: str, learning_rate: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (its states live in CUDA kernels: refused on a CPU)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("optimizer 'adamw8bit' (bitsandbytes) needs a CUDA device; use optimizer 'adamw' "
                             "on a CPU")
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("optimizer 'adamw8bit' needs bitsandbytes: pip install -e '.[gpu]'") from None

        return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
