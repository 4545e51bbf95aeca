"""Cut cascade on real footage with known edits (sample set ground truth)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from curation.chain import analysis_size
from curation.config import CutConfig
from curation.cuts import (
    SMALL_SIZE,
    THUMB_SIZE,
    CutCascade,
    FrameMean,
    FrameNumber,
    SharedHsvAdaptiveDetector,
    SharedHsvContentDetector,
    ThumbRing,
)
from curation.decode import analysis_copy, probe, stream_frames
from tests.curation_helpers import detect_cuts, ground_truth

CUT_FILES = [
    "bikes.mp4", "bigbuckbunny.mp4", "cuts_hard.mp4", "dissolves.mp4", "fade_black.mp4",
    "flashes.mp4", "static_shot.mp4", "text_big.mp4",
]


def _matches(found: list[int], expected: list[int], tolerance: int = 2) -> bool:
    return len(found) == len(expected) and all(abs(f - e) <= tolerance for f, e in zip(found, expected, strict=True))


@pytest.mark.parametrize("name", CUT_FILES)
def test_cascade_finds_every_cut_within_two_frames(sample_dir, name):
    truth = ground_truth(sample_dir)[name]
    found = detect_cuts(sample_dir / "videos" / name)
    assert _matches(found, truth["cuts"]), f"{name}: found {found}, expected {truth['cuts']} ({truth['kind']})"


def test_short_shot_and_jump_cut_survive(sample_dir):
    found = detect_cuts(sample_dir / "videos" / "cuts_hard.mp4")
    assert any(abs(c - 45) <= 2 for c in found), "jump cut inside one scene missed"
    assert any(abs(c - 121) <= 2 for c in found) and any(abs(c - 134) <= 2 for c in found), "0.52 s shot lost"


def test_flashes_and_exposure_jumps_are_not_cuts(sample_dir):
    assert detect_cuts(sample_dir / "videos" / "flashes.mp4") == []


def test_single_native_detector_misses_dissolves_that_the_cascade_finds(sample_dir):
    """The reason for the cascade (docs/recipe.md §1): one native-rate ContentDetector misses gradual transitions."""
    path = sample_dir / "videos" / "dissolves.mp4"
    info = probe(path)
    width, height = analysis_size(info.width, info.height, 128)
    detector = ContentDetector()
    native = []
    for index, frame in enumerate(stream_frames(path)):
        native += [c.frame_num for c in detector.process_frame(FrameTimecode(index, fps=info.fps),
                                                                frame.to_ndarray(width=width, height=height,
                                                                                 format="bgr24"))]
    truth = ground_truth(sample_dir)["dissolves.mp4"]["cuts"]
    native_hits = sum(any(abs(c - t) <= 2 for c in native) for t in truth)
    cascade_hits = sum(any(abs(c - t) <= 2 for c in detect_cuts(path)) for t in truth)
    assert cascade_hits == len(truth)
    assert native_hits < len(truth)


def _analysis_frames(path, width: int = 64) -> tuple[float, list[np.ndarray]]:
    info = probe(path)
    size = analysis_size(info.width, info.height, width)
    return info.fps, [analysis_copy(frame, *size) for frame in stream_frames(path)]


def test_shared_detectors_score_and_cut_like_pyscenedetect(sample_dir):
    """The cascade's content detectors share one HSV image per frame and take int frame numbers, and the fade
    detector takes its frame means from a stand-in stats manager: on real footage every frame score, frame mean
    and cut must be PySceneDetect's own detectors' (fed BGR frames and FrameTimecodes), to the bit."""
    config = CutConfig()
    fps, frames = _analysis_frames(sample_dir / "videos" / "cuts_hard.mp4")
    min_shot = CutCascade(config, fps).min_shot_frames
    adaptive = {"adaptive_threshold": config.native_adaptive_threshold, "min_content_val": config.native_min_content,
                "window_width": config.native_window, "min_scene_len": min_shot}
    pairs = [  # (PySceneDetect's, ours, every n-th frame): the cascade's three levels and a merging flash filter
        (AdaptiveDetector(**adaptive), SharedHsvAdaptiveDetector(**adaptive), 1),
        (ContentDetector(threshold=config.mid_threshold, min_scene_len=1),
         SharedHsvContentDetector(threshold=config.mid_threshold, min_scene_len=1), 3),
        (ContentDetector(threshold=config.low_threshold, min_scene_len=1),
         SharedHsvContentDetector(threshold=config.low_threshold, min_scene_len=1), 12),
        (ContentDetector(threshold=8.0, min_scene_len=20),
         SharedHsvContentDetector(threshold=8.0, min_scene_len=20), 1),
    ]
    rate = FrameTimecode(0, fps=fps).frame_rate
    for theirs, ours, step in pairs:
        their_cuts, our_cuts = [], []
        for index in range(0, len(frames), step):
            frame = frames[index]
            their_cuts += [c.frame_num for c in theirs.process_frame(FrameTimecode(index, fps=fps), frame)]
            our_cuts += [c.frame_num for c in ours.process_frame(FrameNumber.at(index, rate),
                                                                 cv2.cvtColor(frame, cv2.COLOR_BGR2HSV))]
            assert ours._frame_score == theirs._frame_score, f"{type(theirs).__name__} every {step}: frame {index}"
        assert their_cuts, f"{type(theirs).__name__} every {step} found no cut: the comparison would be empty"
        assert our_cuts == their_cuts

    fps, frames = _analysis_frames(sample_dir / "videos" / "fade_black.mp4")
    theirs = ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_shot, fade_bias=0.0)
    ours = ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_shot, fade_bias=0.0)
    ours.stats_manager = mean = FrameMean()
    their_cuts, our_cuts = [], []
    for index, frame in enumerate(frames):
        mean.update(frame)
        assert mean.value == np.mean(frame), f"frame {index}"
        their_cuts += [c.frame_num for c in theirs.process_frame(FrameTimecode(index, fps=fps), frame)]
        our_cuts += [c.frame_num for c in ours.process_frame(FrameTimecode(index, fps=fps), frame)]
    assert their_cuts and our_cuts == their_cuts


def test_thumb_ring_keeps_the_last_frames_across_wraparound(sample_dir):
    """The verification buffer reuses rows: after many wraparounds each buffered index still maps to its own
    frame's thumbnail, normalised thumbnail and histogram, and older frames are gone."""
    _, frames = _analysis_frames(sample_dir / "videos" / "bikes.mp4")
    ring = ThumbRing(capacity=20)
    for index, frame in enumerate(frames):
        ring.append(index, frame, cv2.cvtColor(frame, cv2.COLOR_BGR2HSV))
        if index % 7:
            continue
        assert ring.first == max(0, index - 19) and ring.last == index
        assert ring.row(index - 20) is None and ring.row(index + 1) is None
        oldest = ring.row(ring.first)
        small = cv2.resize(frames[ring.first], SMALL_SIZE, interpolation=cv2.INTER_AREA)
        thumb = cv2.resize(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), THUMB_SIZE,
                           interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        centred = thumb.astype(np.float64) - thumb.astype(np.float64).mean()
        assert np.array_equal(ring.structure(oldest, oldest)[0], thumb)
        assert np.allclose(ring.units(oldest, oldest)[0], centred / np.linalg.norm(centred))
        hist = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_BGR2HSV)], [0, 1], None, [16, 8], [0, 180, 0, 256])
        assert np.allclose(ring.colours(oldest, oldest)[0], hist.ravel() / hist.sum())
