"""A pipeline folder from elsewhere is refused in one line naming the file and the reason, before diffusers reads it;
damaged weights and non-finite outputs are errors, not a black video."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from model.folder_check import PipelineFolderError, check_pipeline_folder
from model.pipeline import NonFiniteOutputError, decode_output

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _copy(svd_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(svd_dir, folder)
    return folder


def _pickle_only(folder: Path) -> str:
    (folder / UNET_WEIGHTS).unlink()
    torch.save({"weight": torch.zeros(2)}, folder / "unet" / "diffusion_pytorch_model.bin")
    return "only pickle weights (diffusion_pytorch_model.bin), which can run code and are never loaded"


def _symlink_to_dev_zero(folder: Path) -> str:
    (folder / UNET_WEIGHTS).unlink()
    (folder / UNET_WEIGHTS).symlink_to("/dev/zero")
    return "a symlink that leads out of the folder (to /dev/zero)"


def _symlink_out(folder: Path) -> str:
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / UNET_WEIGHTS, outside)
    (folder / UNET_WEIGHTS).symlink_to(outside)
    return "a symlink that leads out of the folder"


def _index_is_a_list(folder: Path) -> str:
    (folder / "model_index.json").write_text(json.dumps(["StableVideoDiffusionPipeline"]))
    return "model_index.json: must be a JSON object, got list"


def _truncated(folder: Path) -> str:
    data = (folder / UNET_WEIGHTS).read_bytes()
    (folder / UNET_WEIGHTS).write_bytes(data[: len(data) // 2])
    return "does not fit the file (truncated or damaged)"


def _huge_config(folder: Path) -> str:
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [1_000_000, 2_000_000]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return "in the model its config.json describes"


def _missing_tensor(folder: Path) -> str:
    weights = load_file(folder / UNET_WEIGHTS)
    del weights["conv_in.weight"]
    save_file(weights, folder / UNET_WEIGHTS)
    return "weights miss 1 tensor(s) of the model its config describes, e.g. 'conv_in.weight'"


def _nan_weights(folder: Path) -> str:
    weights = load_file(folder / UNET_WEIGHTS)
    weights["conv_in.weight"] = torch.full_like(weights["conv_in.weight"], float("nan"))
    save_file(weights, folder / UNET_WEIGHTS)
    return "unet.conv_in.weight has"


CASES = {"pickle only": _pickle_only, "symlink to /dev/zero": _symlink_to_dev_zero, "symlink out": _symlink_out,
         "index is a list": _index_is_a_list, "truncated weights": _truncated, "absurd config": _huge_config,
         "missing tensor": _missing_tensor, "NaN weights": _nan_weights}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_checkpoint_is_refused_in_one_line(case, svd_dir, image_path, tmp_path, capsys):
    folder = _copy(svd_dir, tmp_path)
    expected = CASES[case](folder)
    out = tmp_path / "video.mp4"
    returncode = main(["generate", "--image", str(image_path), "--checkpoint", str(folder), "--frames", "2",
                       "--height", "64", "--width", "64", "--steps", "1", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    if case == "NaN weights":  # found once the weights are read: after diffusers' loading progress bars
        lines = lines[-1:]
    assert returncode == 2 and len(lines) == 1, lines[-5:]
    assert lines[0].startswith("lvd generate: error: ") and expected in lines[0], lines[0]
    assert not out.exists()


def test_a_good_folder_passes_and_its_size_is_checked_against_memory(svd_dir):
    summary = check_pipeline_folder(svd_dir)
    assert summary.class_name == "StableVideoDiffusionPipeline"
    unet = load_file(svd_dir / UNET_WEIGHTS)
    assert summary.parameters["unet"] == sum(tensor.numel() for tensor in unet.values())
    with pytest.raises(PipelineFolderError, match=r"parameters \(.*unet .*\) need .* GiB as float32; 0.0 GiB"):
        check_pipeline_folder(svd_dir, memory_bytes=1_000_000)


def test_a_planted_pickle_beside_safetensors_is_never_read(svd_dir, tmp_path):
    """diffusers loads the safetensors; a pickle next to it is not opened (it would run code if it were)."""
    folder = _copy(svd_dir, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    from model.loading import load_pipeline

    pipe = load_pipeline(folder)
    assert pipe.unet.conv_in.weight.shape[1] == 8 and not marker.exists()


def test_non_finite_latents_are_an_error_not_a_black_video():
    latents = torch.zeros(1, 2, 4, 8, 8)
    latents[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="latents hold 1 NaN or infinite values of 512"):
        decode_output(None, latents, 2, "np")
    assert np.isfinite(decode_output(None, torch.zeros(1, 1, 4, 2, 2), 1, "latent").numpy()).all()


def test_a_hub_cache_snapshot_of_links_into_its_blobs_passes(svd_dir, tmp_path):
    """The Hugging Face cache keeps a snapshot as symlinks into the repository's blobs/: that is not an escape."""
    repository = tmp_path / "hub" / "models--stabilityai--stable-video-diffusion-img2vid"
    snapshot = repository / "snapshots" / "0123abcd"
    (repository / "blobs").mkdir(parents=True)
    for number, source in enumerate(sorted(p for p in svd_dir.rglob("*") if p.is_file())):
        blob = repository / "blobs" / f"blob{number}"
        shutil.copy(source, blob)
        link = snapshot / source.relative_to(svd_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    assert check_pipeline_folder(snapshot).parameters == check_pipeline_folder(svd_dir).parameters
    elsewhere = tmp_path / "not-a-snapshot"
    shutil.copytree(snapshot, elsewhere, symlinks=True)
    with pytest.raises(PipelineFolderError, match="a symlink that leads out of the folder"):
        check_pipeline_folder(elsewhere)
