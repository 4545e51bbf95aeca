"""Sampling sizes checked against memory before any model work (`model.memory`): the estimate against the measured
peak of a real tiny SVD pipeline, and `lvd generate` refusing absurd sizes in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from model.memory import ESTIMATE_FACTOR, OVERESTIMATE_FACTOR, estimate_sampling_memory

# Runs in a fresh process: the pipeline is loaded and warmed up at 64 x 64, then the kernel's peak-RSS mark is
# reset (/proc/self/clear_refs 5) so VmHWM afterwards is the sampling call's own peak.
MEASURE = """
import json, sys
import psutil
from PIL import Image
from model.loading import load_pipeline
folder, height, width, frames, chunk = sys.argv[1], *map(int, sys.argv[2:6])
pipe = load_pipeline(folder, device="cpu")
image = Image.new("RGB", (width, height), (120, 80, 40))
pipe(image, height=64, width=64, num_frames=2, num_inference_steps=1, decode_chunk_size=1, progress=False)
before = psutil.Process().memory_info().rss
open("/proc/self/clear_refs", "w").write("5")
pipe(image, height=height, width=width, num_frames=frames, num_inference_steps=2, decode_chunk_size=chunk,
     progress=False)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps(peak - before))
"""


def _measured_peak(folder, height: int, width: int, frames: int, chunk: int) -> int:
    run = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(height), str(width), str(frames),
                          str(chunk)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _estimate(folder, height: int, width: int, frames: int, chunk: int) -> int:
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    estimate = estimate_sampling_memory(unet, vae, parameters=0, height=height, width=width, num_frames=frames,
                                        decode_chunk_size=chunk)
    return estimate.peak  # parameters=0: the weights were loaded before the measurement started


@pytest.mark.slow  # two fresh processes sampling at 256 x 256 and 512 x 512 (~25 s on 2 cores)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
def test_estimate_is_within_its_factors_of_the_measured_peak_at_two_sizes(svd_dir):
    small = (256, 256, 6, 2)
    large = (512, 512, 6, 6)
    measured = [_measured_peak(svd_dir, *size) for size in (small, large)]
    estimated = [_estimate(svd_dir, *size) for size in (small, large)]
    for got, guess in zip(measured, estimated, strict=True):
        assert 1 / OVERESTIMATE_FACTOR <= got / guess <= ESTIMATE_FACTOR, (measured, estimated)
    # it scales as the real peak does (4x the pixels, 3x the decode chunk: several times more memory)
    assert measured[1] > 3 * measured[0] and estimated[1] > 3 * estimated[0], (measured, estimated)


def test_the_estimate_grows_with_pixels_frames_and_decode_chunk():
    unet = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "in_channels": 8}
    vae = {"block_out_channels": [128, 256, 512, 512]}

    def peak(**size) -> int:
        settings = dict(height=576, width=1024, num_frames=14, decode_chunk_size=14) | size
        return estimate_sampling_memory(unet, vae, parameters=2_000_000_000, **settings).peak

    base = peak()
    assert peak(height=1152, width=2048) > 3 * base - 8 * 2**30
    assert peak(num_frames=25, decode_chunk_size=25) > base
    assert peak(decode_chunk_size=2) < base


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "generate", *args], capture_output=True, text=True,
                          timeout=120)


def test_absurd_size_is_refused_in_one_line_naming_the_estimate(svd_dir, image_path, tmp_path):
    started = time.monotonic()
    run = _generate("--image", str(image_path), "--checkpoint", str(svd_dir), "--height", "100000", "--width",
                    "100000", "--out", str(tmp_path / "x.mp4"))
    elapsed = time.monotonic() - started
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and "sampling needs about" in lines[0] and "GiB is available" in lines[0], lines
    assert "--decode-chunk-size" in lines[0]
    assert not (tmp_path / "x.mp4").exists()
    assert elapsed < 60  # no weights were loaded and nothing was sampled


def test_size_not_a_multiple_of_the_vae_downscale_is_refused_before_loading(svd_dir, image_path, tmp_path):
    run = _generate("--image", str(image_path), "--checkpoint", str(svd_dir), "--height", "100", "--width", "64",
                    "--out", str(tmp_path / "x.mp4"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "multiples of 8" in lines[0], run.stderr[-2000:]


def _walk(capsys, *args: str) -> tuple[int, list[str], float]:
    from flows.cli import main

    started = time.monotonic()
    code = main(["walk", *args])
    return code, capsys.readouterr().err.strip().splitlines(), time.monotonic() - started


def test_walk_of_absurd_size_is_refused_in_one_line_naming_the_estimate(svd_dir, image_path, tmp_path, capsys,
                                                                         monkeypatch):
    """`lvd walk` checks one model call's sizes the way `lvd generate` does (the same estimate), before loading."""
    import model.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model.loading, "load_pipeline", no_loading)
    out = tmp_path / "walk.mp4"
    code, lines, elapsed = _walk(capsys, "--images", str(image_path), str(image_path), "--checkpoint", str(svd_dir),
                                 "--height", "100000", "--width", "100000", "--out", str(out))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lvd walk: error: sampling needs about") and "GiB is available" in lines[0], lines
    assert not out.exists() and elapsed < 60


def test_walk_whose_frames_cannot_be_held_is_refused_in_one_line(svd_dir, image_path, tmp_path, capsys):
    """Each model call fits, but the walk keeps all its frames: 10^7 frames of 64 x 64 need ~230 GiB."""
    code, lines, _ = _walk(capsys, "--images", str(image_path), str(image_path), "--checkpoint", str(svd_dir),
                           "--height", "64", "--width", "64", "--frames", "10000000", "--out",
                           str(tmp_path / "walk.mp4"))
    assert code == 2 and len(lines) == 1, lines
    assert "the walk holds about 228.9 GiB" in lines[0] and "10000000 frames at 64x64" in lines[0], lines


def test_walk_sizes_go_through_the_generate_check(svd_dir):
    """The walk's estimate is `lvd generate`'s for the same call: the shared check refuses both alike."""
    from generation.generate import SamplingCall, check_sampling_request

    with pytest.raises(ValueError, match="sampling needs about"):
        check_sampling_request(SamplingCall(str(svd_dir), height=4096, width=4096, num_frames=14,
                                            decode_chunk_size=14), available=2**30)
    # a walk's default size is the U-Net's sample size (8 latents x the VAE's downscale 8), not image mode's 576x1024
    assert check_sampling_request(SamplingCall(str(svd_dir)), available=2**40) == (64, 64)
