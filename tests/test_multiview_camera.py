"""SVD-MV's camera the paper's way (App. D.6, docs/recipe.md §7): the elevation as a fourth added-time id, on a
tiny random diffusers SVD (`svd_dir`). The training side (orbit shards -> a few optimizer steps -> an export
whose videos depend on the elevation) is in tests/test_multiview.py, beside the rendered orbits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.svd_helpers import bikes_frame


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, 8, generator=generator)
    context = torch.randn(2, 1, 32, generator=generator)
    ids = torch.tensor([[6.0, 127.0, 0.02], [6.0, 127.0, 0.3]])
    return sample, torch.tensor([0.5, 1.5]), context, ids


def test_widening_keeps_every_output_at_step_0(svd_dir):
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import takes_elevation, with_elevation_condition

    unet = ImageToVideoPipeline.from_pretrained(svd_dir).unet.eval()
    widened = with_elevation_condition(unet)
    width = unet.config.addition_time_embed_dim
    assert widened.add_embedding.linear_1.in_features == unet.add_embedding.linear_1.in_features + width == 4 * width
    assert widened.config.projection_class_embeddings_input_dim == 4 * width and takes_elevation(widened)
    old, new = unet.add_embedding.linear_1.weight, widened.add_embedding.linear_1.weight
    assert torch.equal(new[:, : 3 * width], old) and not new[:, 3 * width:].any()
    assert with_elevation_condition(widened) is widened  # an SVD-MV U-Net already takes it
    sample, timestep, context, ids = unet_inputs()
    with torch.no_grad():
        reference = unet(sample, timestep, context, ids).sample
        for elevation in (-5.0, 0.0, 12.5, 30.0, 89.0):
            four = torch.cat([ids, torch.full((2, 1), elevation)], dim=1)
            torch.testing.assert_close(widened(sample, timestep, context, four).sample, reference, atol=0, rtol=0)
        with pytest.raises(ValueError, match=r"added_time_ids must be \(2, 4\)"):
            widened(sample, timestep, context, ids)


def test_export_round_trips_with_1024_style_config_and_stock_diffusers_loads_it(svd_dir, tmp_path):
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_elevation_condition

    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    pipe.unet = with_elevation_condition(pipe.unet)
    with torch.no_grad():  # as if trained: the elevation columns moved
        pipe.unet.add_embedding.linear_1.weight[:, -32:].normal_(generator=torch.Generator().manual_seed(0))
    pipe.save_pretrained(tmp_path / "mv")
    config = json.loads((tmp_path / "mv" / "unet" / "config.json").read_text())
    assert (config["_class_name"], config["projection_class_embeddings_input_dim"],
            config["addition_time_embed_dim"]) == ("UNetSpatioTemporalConditionModel", 128, 32)
    stock = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "mv", subfolder="unet")
    ours = ImageToVideoPipeline.from_pretrained(tmp_path / "mv").unet
    for loaded in (stock, ours):
        assert loaded.add_embedding.linear_1.in_features == 128
        assert torch.equal(loaded.add_embedding.linear_1.weight, pipe.unet.add_embedding.linear_1.weight)
    sample, timestep, context, ids = unet_inputs()
    four = torch.cat([ids, torch.tensor([[10.0], [25.0]])], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(stock(sample, timestep, context, four).sample,
                                   pipe.unet(sample, timestep, context, four).sample)
    # diffusers' stock pipeline loads the folder but builds only three ids: it cannot run an SVD-MV U-Net
    svd = StableVideoDiffusionPipeline.from_pretrained(tmp_path / "mv")
    with pytest.raises(ValueError, match="expects an added time embedding vector of length 128"):
        svd(bikes_frame().resize((64, 64)), height=64, width=64, num_frames=4, num_inference_steps=1)


def test_pipeline_refuses_a_missing_or_unwanted_elevation_in_one_line(svd_dir):
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_elevation_condition

    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    image = bikes_frame().resize((64, 64))
    common = dict(height=64, width=64, num_frames=4, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="elevation given, but this U-Net embeds 3 added-time ids") as unwanted:
        pipe(image, elevation=10.0, **common)
    pipe.unet = with_elevation_condition(pipe.unet)
    with pytest.raises(ValueError, match="fourth added-time id .*pass elevation=<degrees>") as missing:
        pipe(image, **common)
    assert "\n" not in str(unwanted.value) and "\n" not in str(missing.value)


def test_pipeline_passes_the_elevation_as_the_fourth_id(svd_dir):
    """With guidance on (both halves) and off, per image and per batch: the U-Net sees [fps - 1, 127, aug, elev]."""
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_elevation_condition

    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    pipe.unet = with_elevation_condition(pipe.unet)
    seen: list[torch.Tensor] = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda *args, **kwargs: seen.append(kwargs["added_time_ids"]) or forward(*args, **kwargs)
    image = bikes_frame().resize((64, 64))
    common = dict(height=64, width=64, num_frames=4, num_inference_steps=1, progress=False, fps=7)
    pipe(image, elevation=20.0, max_guidance_scale=3.0, **common)
    pipe([image, image], elevation=torch.tensor([5.0, 30.0]), max_guidance_scale=1.0, **common)
    pipe([image, image], elevation=torch.tensor([5.0, 30.0]), max_guidance_scale=3.0, **common)
    assert seen[0].tolist() == [[6.0, 127.0, pytest.approx(0.02), 20.0]] * 2
    assert seen[1][:, 3].tolist() == [5.0, 30.0]
    assert seen[2][:, 3].tolist() == [5.0, 30.0, 5.0, 30.0]


def test_generate_passes_the_elevation_of_a_paper_export(svd_dir, tmp_path, capsys):
    """`lvd generate --views --elevation` with an SVD-MV export: the elevation reaches the fourth id, so once its
    columns are trained, two elevations give two different orbits (the same at step 0, when they are zero)."""
    from generation.generate import GenerateRequest, generate_videos
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_elevation_condition

    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    pipe.unet = with_elevation_condition(pipe.unet)
    pipe.save_pretrained(tmp_path / "step0")
    with torch.no_grad():
        pipe.unet.add_embedding.linear_1.weight[:, -32:].normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    pipe.save_pretrained(tmp_path / "moved")
    image = tmp_path / "object.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(image)

    def orbit(checkpoint: str, elevation: float) -> np.ndarray:
        generated = generate_videos(GenerateRequest(checkpoint=str(tmp_path / checkpoint), image=str(image),
                                                    views=4, elevation=elevation, height=64, width=64, steps=2),
                                    progress=False)
        assert generated.settings["elevation"] == elevation and generated.settings["motion_bucket_id"] == 127
        return generated.videos

    assert np.array_equal(orbit("step0", 0.0), orbit("step0", 30.0))
    low, high = orbit("moved", 0.0), orbit("moved", 30.0)
    assert low.shape == (1, 4, 64, 64, 3) and np.abs(low.astype(int) - high.astype(int)).mean() > 0.5
    from flows.cli import main  # not a multi-view request, so no elevation: one line, exit 2

    assert main(["generate", "--image", str(image), "--checkpoint", str(tmp_path / "moved"), "--height", "64",
                 "--width", "64", "--steps", "1", "--out", str(tmp_path / "video.gif")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lvd generate: error")]
    assert len(errors) == 1 and "this U-Net embeds the camera elevation as a fourth added-time id" in errors[0]
    error = errors[0]
    assert "--elevation DEG" in error and "\n" not in error and not (tmp_path / "video.gif").exists()
