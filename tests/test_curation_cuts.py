"""Cut cascade on real footage with known edits (sample set ground truth)."""

from __future__ import annotations

import pytest
from scenedetect import FrameTimecode
from scenedetect.detectors import ContentDetector

from curation.chain import analysis_size
from curation.decode import probe, stream_frames
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
