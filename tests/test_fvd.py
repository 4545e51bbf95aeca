"""FVD/KVD: the maths against closed forms, the reference preprocessing, behaviour on real footage
(identical sets ~0, growing with blur and shuffled frames), `lvd fvd` with its cache, and bad inputs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch

import flows.evaluate  # noqa: F401  (imports prefect now: its log handler must not bind to a capsys stream)
from common.video import decode_frames_at, write_video
from curation.sample_data import footage_paths
from evaluation.fvd import (
    FolderFvdRequest,
    I3DFeatureExtractor,
    VideoSetError,
    compute_fvd,
    frame_indices,
    frechet_distance,
    i3d_input,
    kernel_distance,
    read_clip,
    resize_bilinear_tf,
)
from evaluation.i3d import ensure_i3d_weights
from flows.cli import main as lvd


@functools.cache
def real_clips() -> np.ndarray:
    """Eight 16-frame clips of real footage (different shots of three sources), 160x120."""
    paths = footage_paths()
    cuts = [("bikes", 0), ("bikes", 60), ("bikes", 120), ("bikes", 190), ("bigbuckbunny", 0), ("bigbuckbunny", 70),
            ("carphone", 0), ("carphone", 60)]
    clips = []
    for name, start in cuts:
        frames = decode_frames_at(paths[name], range(start, start + 16))
        clips.append(np.stack([cv2.resize(rgb, (160, 120), interpolation=cv2.INTER_AREA) for rgb in frames]))
    return np.stack(clips)


@pytest.fixture(scope="module")
def extractor() -> I3DFeatureExtractor:
    ensure_i3d_weights()
    return I3DFeatureExtractor(device="cpu", batch_size=8, threads=2)


# ------------------------------------------------------------------------------------------------ maths


def test_frechet_distance_matches_the_closed_form_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(400, 16)) @ rng.normal(size=(16, 16))
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # Diagonal Gaussians: FD = |mu_a - mu_b|^2 + sum (s_a + s_b - 2 sqrt(s_a s_b)).
    x = np.diag([1.0, 4.0]) @ np.array([[1, -1, 1, -1], [1, 1, -1, -1]], float) * np.sqrt(3) / 2
    y = x * 2 + 5
    var_x, var_y = np.var(x, axis=1, ddof=1), np.var(y, axis=1, ddof=1)
    closed = 2 * 25 + (var_x + var_y - 2 * np.sqrt(var_x * var_y)).sum()
    assert frechet_distance(x.T, y.T) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_is_safe_for_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(5, 400))  # fewer videos than dimensions, like a small test set
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)
    value = frechet_distance(few, rng.normal(size=(7, 400)))
    assert np.isfinite(value) and value > 0


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(loc=0.5, size=(6, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    cross = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    assert kernel_distance(x, y, num_subsets=3) == pytest.approx(within - 2 * cross, rel=1e-10)
    big = rng.normal(size=(600, 8))
    assert abs(kernel_distance(big[:300], big[300:], num_subsets=5)) < 0.1 < kernel_distance(big, big + 1.0, 5)


def test_fewer_than_two_videos_is_an_error():
    with pytest.raises(VideoSetError, match="at least 2 videos"):
        frechet_distance(np.zeros((1, 400)), np.zeros((5, 400)))


def test_resize_follows_tf1_bilinear_grid():
    # Upsampling 2 -> 4: source positions 0, 0.5, 1, 1.5 (clamped), no half-pixel shift.
    x = torch.tensor([[[[10.0, 20.0]]]])
    assert resize_bilinear_tf(x, 1, 4)[0, 0, 0].tolist() == [10.0, 15.0, 20.0, 20.0]
    # Downsampling 4 -> 2 samples pixels 0 and 2 exactly.
    y = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert resize_bilinear_tf(y, 2, 2)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]


def test_i3d_input_is_224_and_in_minus_one_to_one():
    clips = np.zeros((2, 10, 120, 160, 3), np.uint8)
    clips[0] = 255
    x = i3d_input(clips)
    assert x.shape == (2, 3, 10, 224, 224)
    assert x[0].min() == 1.0 and x[1].max() == -1.0


def test_frame_indices_resample_to_the_target_rate():
    assert frame_indices(4, 25.0, 25.0) == [0, 1, 2, 3]
    assert frame_indices(4, 29.97, 25.0) == [0, 1, 2, 4]
    assert frame_indices(3, 50.0, 25.0) == [0, 2, 4]
    assert frame_indices(3, None, 25.0) == [0, 1, 2]


# ------------------------------------------------------------------------------------------ real footage


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_fvd_is_zero_for_the_same_set_and_grows_with_degradation(extractor):
    real = real_clips()
    rng = np.random.default_rng(0)

    def blurred(sigma: float) -> np.ndarray:
        return np.stack([[cv2.GaussianBlur(frame, (0, 0), sigma) for frame in clip] for clip in real])

    shuffled = np.stack([clip[rng.permutation(len(clip))] for clip in real])
    features = {name: extractor.features(list(clips)) for name, clips in
                [("real", real), ("blur1", blurred(1.0)), ("blur3", blurred(3.0)), ("shuffled", shuffled)]}
    same = frechet_distance(features["real"], features["real"])
    mild, strong = (frechet_distance(features["real"], features[k]) for k in ("blur1", "blur3"))
    shuffle = frechet_distance(features["real"], features["shuffled"])
    assert same < 1e-6
    assert 50 < mild < strong, (mild, strong)
    assert shuffle > 50, shuffle  # I3D sees motion: same frames in the wrong order are far away
    assert kernel_distance(features["real"], features["blur3"]) > kernel_distance(features["real"], features["blur1"])


def _write_set(folder: Path, clips: np.ndarray, fps: float = 25.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, clip in enumerate(clips):
        write_video(folder / f"clip{index:02d}.mp4", clip, fps, crf=12)
    return folder


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_lvd_fvd_json_and_real_feature_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LVD_I3D_WEIGHTS", str(ensure_i3d_weights()))
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "cache"))
    real = _write_set(tmp_path / "real", real_clips()[:4])
    fake = _write_set(tmp_path / "fake", np.stack([[cv2.GaussianBlur(f, (0, 0), 3) for f in c]
                                                   for c in real_clips()[4:8]]))
    assert lvd(["fvd", str(real), str(fake), "--json", "--batch-size", "4", "--threads", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(first) == {"fvd", "kvd", "num_real", "num_fake"}
    assert first["num_real"] == first["num_fake"] == 4 and first["fvd"] > 50
    cached = list((tmp_path / "cache" / "fvd").glob("*.npz"))
    assert len(cached) == 1
    # Same content -> cache hit with identical numbers; changed content -> a new cache entry.
    result = compute_fvd(FolderFvdRequest(str(real), str(fake), batch_size=4))
    assert result["real_features_cached"] and result["fvd"] == pytest.approx(first["fvd"], rel=1e-9)
    write_video(real / "clip00.mp4", real_clips()[7], 25.0, crf=12)
    assert not compute_fvd(FolderFvdRequest(str(real), str(fake), batch_size=4))["real_features_cached"]
    assert len(list((tmp_path / "cache" / "fvd").glob("*.npz"))) == 2


def test_bad_inputs_give_clear_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LVD_I3D_WEIGHTS", str(ensure_i3d_weights()))
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "cache"))
    good = _write_set(tmp_path / "good", real_clips()[:2])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lvd(["fvd", str(empty), str(good)]) == 2
    assert "no video files" in capsys.readouterr().err
    assert lvd(["fvd", str(tmp_path / "missing"), str(good)]) == 2
    assert "does not exist" in capsys.readouterr().err
    one = _write_set(tmp_path / "one", real_clips()[:1])
    assert lvd(["fvd", str(good), str(one)]) == 2
    assert "at least 2 videos, found 1" in capsys.readouterr().err
    broken = _write_set(tmp_path / "broken", real_clips()[:2])
    (broken / "clip01.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    assert lvd(["fvd", str(good), str(broken)]) == 2
    assert "clip01.mp4: not a readable video" in capsys.readouterr().err
    short = _write_set(tmp_path / "short", real_clips()[:2, :5])
    assert lvd(["fvd", str(good), str(short)]) == 2
    assert "too few frames (5 decoded, 16 needed)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_frames must be >= 9"):
        compute_fvd(FolderFvdRequest(str(good), str(good), num_frames=8))
    with pytest.raises(VideoSetError, match="too few frames"):
        read_clip(short / "clip00.mp4", 16)
