"""`lvd generate` and the `generate-video` flow (real local Prefect server) on the tiny model."""

from __future__ import annotations

import subprocess
import sys

import av
import httpx
import pytest

from dataformat.generation import read_generation_record
from flows.generate import generate_video, parse_guidance
from model.pipeline import TextToVideoPipeline


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_cli_generates_a_decodable_mp4_from_a_checkpoint(tmp_path):
    TextToVideoPipeline.from_preset("tiny", seed=1).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "clip.mp4"
    command = [sys.executable, "-m", "flows.cli", "generate"]
    bad = subprocess.Popen([*command, "x", "--checkpoint", str(tmp_path / "ckpt" / "unet")], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # runs beside the good one
    run = subprocess.run([*command, "a red car", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                          "--frames", "6", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "ckpt", out])
    _, bad_stderr = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "not a pipeline directory" in bad_stderr


def test_flow_writes_videos_and_a_preview_artifact(prefect_api, tmp_path):
    results = generate_video(prompts=["a cyclist", "a rabbit"], output_dir=str(tmp_path), num_frames=6, steps=2)
    assert [r["prompt"] for r in results] == ["a cyclist", "a rabbit"]
    for result in results:
        with av.open(result["mp4"]) as container:
            assert sum(1 for _ in container.decode(video=0)) == 6
        record = read_generation_record(result["mp4"])  # what a preference study pairs videos by
        assert (record["prompt"], record["seed"], record["image"]) == (result["prompt"], 0, None)
        assert record["settings"]["num_frames"] == 6
    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["generate-video-preview"]}}, "sort": "CREATED_DESC", "limit": 1})
    artifacts = response.json()
    assert response.status_code == 200 and artifacts and "data:image/gif;base64," in artifacts[0]["data"]


def test_guidance_parsing():
    assert parse_guidance("7") == 7.0 and parse_guidance("1.0,2.5") == (1.0, 2.5)
    with pytest.raises(ValueError, match="min,max"):
        parse_guidance("1,2,3")
