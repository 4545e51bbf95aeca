"""Zero-shot UCF-101 protocol: class distribution, prompts, seeds, resize/crop, and `evaluate-fvd` end to end
(tiny pipeline, real footage as the "real" set, a real Prefect server, tiny CLIP for CLIPSIM)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from common.video import resize_cover_crop
from evaluation.fvd import PROTOCOL_RESIZE
from evaluation.ucf101 import (
    CLASS_COUNTS,
    CLASS_NAMES,
    ProtocolSettings,
    allocate,
    class_prompt,
    counts_from_root,
    generate_videos,
    protocol_videos,
)


def test_ucf101_classes_and_counts_are_the_datasets():
    assert len(CLASS_NAMES) == 101 and sum(CLASS_COUNTS.values()) == 13_320
    assert CLASS_NAMES[0] == "ApplyEyeMakeup" and CLASS_NAMES[-1] == "YoYo"
    assert min(CLASS_COUNTS.values()) == 100 and max(CLASS_COUNTS.values()) == 167  # CricketShot
    assert CLASS_COUNTS["ApplyEyeMakeup"] == 145 and CLASS_COUNTS["PlayingViolin"] == 100


def test_allocation_keeps_the_class_distribution():
    assert allocate(13_320) == CLASS_COUNTS
    for total in (7, 101, 1000, 2048):
        shares = allocate(total)
        assert sum(shares.values()) == total
        for name, count in shares.items():
            assert abs(count - total * CLASS_COUNTS[name] / 13_320) < 1
    with pytest.raises(ValueError):
        allocate(0)


def test_prompts_and_seeds():
    assert class_prompt("ApplyEyeMakeup") == "apply eye makeup"
    assert class_prompt("YoYo") == "yo yo" and class_prompt("TaiChi") == "tai chi"
    videos = protocol_videos(13_320, seed=5)
    assert len(videos) == 13_320 and [v.index for v in videos] == list(range(13_320))
    assert videos[0].prompt == "apply eye makeup" and videos[0].seed == 5 and videos[-1].seed == 13_324
    assert sum(v.class_name == "CricketShot" for v in videos) == 167


def test_counts_from_a_local_ucf101_copy(tmp_path):
    for name, count in (("Archery", 3), ("YoYo", 2)):
        for index in range(count):
            path = tmp_path / name / f"v_{name}_g{index + 1:02d}_c01.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    assert counts_from_root(tmp_path) == {"Archery": 3, "YoYo": 2}


def resize_crop(clips: np.ndarray, height: int = 240, width: int = 320) -> np.ndarray:
    return resize_cover_crop(clips, height, width, interpolation=PROTOCOL_RESIZE)


def test_resize_crop_320x576_gives_240x320_centre():
    columns = np.linspace(0, 255, 576).astype(np.uint8)
    video = np.broadcast_to(columns[None, None, :, None], (16, 320, 576, 3)).copy()
    out = resize_crop(video)
    assert out.shape == (16, 240, 320, 3) and out.dtype == np.uint8
    # 576 -> 432 wide, crop columns 56..376 of the resized frame = columns 74.7..501.3 of the original.
    assert abs(int(out[0, 0, 0, 0]) - 255 * 75 / 575) <= 2
    assert abs(int(out[0, 0, -1, 0]) - 255 * 501 / 575) <= 2
    assert resize_crop(video[None]).shape == (1, 16, 240, 320, 3)
    with pytest.raises(ValueError):
        resize_crop(video.astype(np.float32))


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_generation_is_independent_of_batch_size():
    from model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_preset("tiny")
    settings = ProtocolSettings(num_videos=3, height=64, width=112, steps=2)
    videos = protocol_videos(3)
    together = generate_videos(pipe, videos[:2], settings)
    alone = generate_videos(pipe, videos[1:2], settings)
    assert together.shape == (2, 16, 240, 320, 3)
    assert np.abs(together[1].astype(int) - alone[0]).max() <= 2  # float batch effects only
    assert np.abs(together[0].astype(int) - together[1]).max() > 20  # different seeds/prompts


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import torch
    from open_clip.model import CLIP

    from common.openclip import save_local_dir
    from tests.scorer_helpers import TINY_CLIP

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    save_local_dir(CLIP(**TINY_CLIP), TINY_CLIP, folder)
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def real_set(tmp_path_factory) -> Path:
    """Four real-footage clips at UCF-101's geometry (320x240, 25 fps) standing in for UCF-101."""
    from common.video import write_video
    from tests.test_fvd import real_clips

    folder = tmp_path_factory.mktemp("ucf-real")
    for index, clip in enumerate(real_clips()[:4]):
        write_video(folder / f"clip{index}.mp4", resize_crop(clip, 240, 320), 25.0, crf=12)
    return folder


def test_evaluate_fvd_flow_end_to_end(prefect_api, real_set, tiny_clip, tmp_path, monkeypatch):
    import httpx

    from evaluation.i3d import ensure_i3d_weights
    from flows.evaluate import evaluate_fvd

    monkeypatch.setenv("LVD_I3D_WEIGHTS", str(ensure_i3d_weights()))
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    params = dict(real_dir=str(real_set), output_dir=str(out), num_videos=4, batch_size=2, shard_size=2,
                  steps=2, height=64, width=112, clip_model=tiny_clip)
    summary = evaluate_fvd(**params)
    assert summary["num_fake"] == 4 and summary["num_real"] == 4
    assert np.isfinite(summary["fvd"]) and summary["fvd"] > 0 and np.isfinite(summary["kvd"])
    assert -1 <= summary["clipsim"] <= 1
    assert summary["settings"]["guidance_scale"] == 7.0 and summary["settings"]["fps"] == 25
    assert json.loads((out / "results.json").read_text())["fvd"] == summary["fvd"]
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert len(videos) == 4
    assert sorted(p.parent.name for p in videos) == sorted(n for n, c in allocate(4).items() for _ in range(c))
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        assert (len(frames), stream.height, stream.width) == (16, 240, 320)
    assert (out / "sample_grid.jpg").stat().st_size > 0

    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["evaluate-fvd"]}}, "sort": "CREATED_DESC", "limit": 1})
    assert response.status_code == 200, response.text
    markdown = response.json()[0]["data"]
    assert f"{summary['fvd']:.2f}" in markdown and "data:image/jpeg;base64," in markdown and "CLIPSIM" in markdown

    # A re-run with the same settings reuses the shards and the cached real features: same numbers.
    shard_times = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.npz")}
    again = evaluate_fvd(**params)
    assert again["fvd"] == pytest.approx(summary["fvd"], rel=1e-9) and again["real_features_cached"]
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.npz")} == shard_times


def test_evaluate_fvd_rejects_bad_settings(tmp_path, real_set):
    from flows.evaluate import evaluate_fvd

    with pytest.raises(ValueError, match="num_videos must be >= 2"):
        evaluate_fvd.fn(real_dir=str(real_set), num_videos=1, output_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no video files"):
        evaluate_fvd.fn(real_dir=str(empty), num_videos=4, output_dir=str(tmp_path))
