"""The memory plan (training/memory_plan.py, `lvd train --plan`): the live-bytes tracker, the fake pass against
the same pass on real tensors, how the estimate moves with each setting, and the plan of the real SVD sizes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from model.unet import PRESETS, VideoUNet
from training.memory_plan import (
    GIB,
    SVD_VAE,
    LiveMemory,
    TrainingSetup,
    estimate,
    measure_unet_pass,
    unet_step_memory,
)
from training.request import StageRunRequest

TINY_IMAGE_UNET = {**PRESETS["tiny"], "in_channels": 8}
TINY_VAE = {**SVD_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
TINY_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                    patch_size=32, projection_dim=64)
SETUP = TrainingSetup(frames=14, height=64, width=64, micro_batch=1, accumulation=1, trainable="all", lora_rank=4,
                      checkpointing=False, bf16=True, optimizer="adamw", ema=True, fsdp_workers=1)


@pytest.mark.parametrize("fake", [False, True])
def test_live_memory_counts_storages_while_they_live(fake):
    mode = FakeTensorMode() if fake else None
    with mode or torch.no_grad():
        source = torch.ones(1000)  # made before tracking: not counted
        memory = LiveMemory()
        with memory:
            doubled = source * 2  # 4000 B
            view = doubled[:10]  # same storage: nothing new
            summed = doubled + view.sum()  # 4000 B, plus a 4 B scalar that dies at once
            del doubled  # its storage lives on in `view`
            halved = summed.to(torch.bfloat16)  # 2000 B
        assert memory.peak == 10000
        del view
        assert memory.live == 6000
        del summed, halved
        assert memory.live == 0


def test_the_fake_pass_holds_what_the_same_pass_on_real_tensors_holds():
    """The plan's pass under FakeTensorMode and the same step on real CPU tensors of the same tiny U-Net
    allocate the same bytes: the fake tensors stand for the real ones storage by storage."""
    from training.trainable import add_lora

    fake = measure_unet_pass(json.dumps(TINY_IMAGE_UNET), 4, 64, 64, "lora", 4, True, True, False, 1)
    torch.manual_seed(0)
    unet = VideoUNet(**{**TINY_IMAGE_UNET, "num_frames": 4})
    add_lora(unet, 4, 4.0)
    real = unet_step_memory(unet, 4, 64, 64, "lora", True, True, False, 1)  # LoRA, checkpointing, bf16 autocast
    assert real == fake
    assert real.gradients == 4 * real.trainable, "every trained parameter got a float32 gradient"


def _tiny(**changes) -> float:
    return estimate(TINY_IMAGE_UNET, replace(SETUP, **changes), TINY_VAE, TINY_ENCODER, "image")


def test_the_estimate_moves_the_way_each_setting_moves_memory():
    base = _tiny()
    assert base.weights == base.ema == 4 * base.parameters and base.optimizer_state == 8 * base.trainable
    assert _tiny(checkpointing=True).unet_pass < base.unet_pass
    lora = _tiny(trainable="lora")
    assert lora.trainable < base.trainable / 10 and lora.optimizer_state < base.optimizer_state / 10
    assert lora.unet_pass < base.unet_pass  # frozen layers save less for backward
    assert _tiny(trainable="temporal").optimizer_state < base.optimizer_state
    assert _tiny(frames=25).unet_pass > 1.5 * base.unet_pass
    assert _tiny(micro_batch=2).unet_pass > 1.8 * (base.unet_pass - base.gradients)
    assert _tiny(optimizer="adamw8bit").optimizer_state < base.optimizer_state / 3.5
    sharded = _tiny(fsdp_workers=4)
    assert sharded.gradients == base.gradients // 4 and sharded.optimizer_state == base.optimizer_state // 4
    assert _tiny(ema=False).ema == 0
    assert _tiny(bf16=False).unet_pass > base.unet_pass
    assert base.peak == (base.weights + base.optimizer_state + base.ema + base.frozen_models
                         + max(base.unet_pass, base.vae_encode, base.optimizer_step))


def test_plan_of_the_tiny_stage_through_the_cli(tmp_path, capsys):
    from flows.cli import main

    assert main(["train", "--stage", "3", "--conditioning", "image", "--data", str(tmp_path), "--output-root",
                 str(tmp_path / "out"), "--trainable", "lora", "--lora-rank", "4", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "stage 3 (tiny, image-to-video): 12 optimizer steps" in text
    assert "trainable lora:" in text and "LoRA rank 4" in text and "fits 24 GB, 48 GB, 80 GB" in text
    assert not (tmp_path / "out").exists(), "a plan trains nothing and writes nothing"


@pytest.mark.slow  # the real 1.5 B-parameter U-Net through two fake passes: 14 s idle, minutes when loaded
def test_plan_of_the_real_svd_and_svd_xt_sizes(tmp_path):
    """svd stage III image-to-video at 576x1024 with LoRA and micro-batch 1, from the published architecture;
    then the same at SVD-XT's 25 frames (from a config-only SVD-XT folder: no weights needed)."""
    from training.memory_plan import plan_stage

    request = StageRunRequest.build(stage=3, preset="svd", conditioning="image", data=str(tmp_path),
                                    output_root=str(tmp_path / "out"), trainable="lora", micro_batch_size=1,
                                    plan=True)
    plan = plan_stage(request)
    phase = plan["phases"][0]
    assert (phase["height"], phase["width"], phase["frames"]) == (576, 1024, 14)
    assert 1_500_000_000 < phase["parameters"] < 1_550_000_000  # SVD's U-Net: 1.52 B (+ the adapters)
    assert phase["trainable_parameters"] < 0.01 * phase["parameters"]
    assert 20 < plan["peak_gib"] < 80 and plan["fits_gb"][-1] == 80
    assert "peak GPU memory per worker" in plan["text"]

    xt = tmp_path / "svd-xt"
    (xt / "unet").mkdir(parents=True)
    (xt / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    (xt / "unet" / "config.json").write_text(json.dumps({**PRESETS["svd"], "in_channels": 8, "num_frames": 25,
                                                         "_class_name": "UNetSpatioTemporalConditionModel"}))
    from training.memory_plan import architecture

    arch = architecture("svd", "image", str(xt))
    assert arch.unet["num_frames"] == 25 and arch.vae == SVD_VAE
    setup = TrainingSetup(frames=14, height=576, width=1024, micro_batch=1, accumulation=768, trainable="lora",
                          lora_rank=16, checkpointing=True, bf16=True, optimizer="adamw", ema=True, fsdp_workers=1)
    fourteen = estimate(arch.unet, setup, arch.vae, arch.encoder, "image")
    twenty_five = estimate(arch.unet, replace(setup, frames=25), arch.vae, arch.encoder, "image")
    assert fourteen.peak == pytest.approx(plan["peak_gib"] * GIB, rel=1e-6)
    assert twenty_five.unet_pass > 1.5 * fourteen.unet_pass
