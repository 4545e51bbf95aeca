"""Text area (docs/recipe.md §1 OCR filter) with the real PP-OCRv4 detector on real footage with drawn text, and
the CRAFT loading path with a random-init state dict."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import CurationConfig, default_filter_rules
from curation.filtering import apply_filters
from curation.scorers.base import MissingWeightsError
from curation.scorers.config import TextAreaConfig
from curation.scorers.text_area import TextAreaScorer, covered_fraction
from curation.types import ClipFrames
from tests.scorer_helpers import footage, text_clip

OVERLAYS = {
    "none": [],
    "small": [("cam 2", 0.9, 2, (540, 345))],
    "medium": [("BREAKING NEWS", 1.0, 2, (30, 200))],
    "large": [("BREAKING NEWS", 2.4, 5, (30, 120)), ("LIVE 24/7", 2.4, 5, (30, 300))],
}


@pytest.fixture(scope="module")
def ppocr() -> TextAreaScorer:
    return TextAreaScorer(TextAreaConfig(backend="ppocr"), device="cpu")


@pytest.fixture(scope="module")
def overlay_clips():
    return {name: text_clip(name, lines) for name, lines in OVERLAYS.items()}


def test_text_area_orders_clips_by_drawn_text_and_tracks_its_size(ppocr, overlay_clips):
    clips = [clip for clip, _ in overlay_clips.values()]
    rows = ppocr.score(clips)
    area = {clip.clip_id: row["text_area"] for clip, row in zip(clips, rows, strict=True)}
    assert area["none"] < 0.005
    assert area["none"] < area["small"] < area["medium"] < area["large"]
    for name in ("medium", "large"):
        drawn = overlay_clips[name][1]
        assert 0.5 * drawn < area[name] < 2.0 * drawn, (name, area[name], drawn)


def test_seven_percent_rule_drops_only_the_large_overlay(ppocr, overlay_clips):
    clips = [clip for clip, _ in overlay_clips.values()]
    rows = [{"clip_id": clip.clip_id, **row} for clip, row in zip(clips, ppocr.score(clips), strict=True)]
    rules = [rule for rule in default_filter_rules() if rule.name == "text_over_7pct"]
    apply_filters(rows, rules)
    assert [row["clip_id"] for row in rows if not row["keep"]] == ["large"]


def test_text_on_one_frame_counts_through_the_max_over_frames(ppocr):
    everywhere, _ = text_clip("all", OVERLAYS["large"])
    first_only, _ = text_clip("first", OVERLAYS["large"], only_first=True)
    per_frame = ppocr.frame_areas([first_only])[0]
    assert per_frame[0] > 0.07 and max(per_frame[1:]) < 0.005
    all_rows, first_rows = ppocr.score([everywhere]), ppocr.score([first_only])
    assert first_rows[0]["text_area"] == pytest.approx(per_frame[0])
    assert first_rows[0]["text_area"] == pytest.approx(all_rows[0]["text_area"], rel=0.25)


def test_real_scene_text_is_detected(ppocr):
    # bikes.mp4 frames 60-75 show a taxi roof sign reading TAXI.
    clip = ClipFrames("taxi", np.stack([footage()[i] for i in (62, 68, 74)]))
    assert ppocr.score([clip])[0]["text_area"] > 0.01


def test_batched_equals_one_at_a_time(ppocr, overlay_clips):
    clips = [clip for clip, _ in overlay_clips.values()]
    small = ClipFrames("small-size", np.stack([f[::2, ::2] for f in overlay_clips["large"][0].frames]))
    batch = ppocr.score([*clips, small])
    single = [ppocr.score([clip])[0] for clip in [*clips, small]]
    assert batch == single
    many = TextAreaScorer(TextAreaConfig(backend="ppocr", frames_per_forward=6), device="cpu")
    for a, b in zip(many.score(clips), batch, strict=False):
        assert a["text_area"] == pytest.approx(b["text_area"], abs=2e-3)


def test_bad_clips_become_error_rows_and_the_rest_is_scored(ppocr, overlay_clips):
    good = overlay_clips["large"][0]
    bad = [
        ClipFrames("tiny", np.zeros((3, 8, 8, 3), np.uint8)),
        ClipFrames("float", np.zeros((3, 64, 64, 3), np.float32)),
        ClipFrames("gray", np.zeros((3, 64, 64), np.uint8)),
        ClipFrames("empty", np.zeros((0, 64, 64, 3), np.uint8)),
    ]
    rows = ppocr.score([bad[0], good, *bad[1:]])
    assert rows[1]["text_area"] > 0.07 and "error" not in rows[1]
    for row in rows[:1] + rows[2:]:
        assert row["text_area"] is None and row["error"].startswith("text_area:")


def test_covered_fraction_counts_overlaps_once():
    box = np.array([[0, 0], [49, 0], [49, 49], [0, 49]], np.float32)
    assert covered_fraction([box], 100, 100) == pytest.approx(0.25)
    assert covered_fraction([box, box + 25], 100, 100) == pytest.approx((2 * 2500 - 625) / 10000)
    assert covered_fraction([], 100, 100) == 0.0


def test_craft_backend_loads_weights_from_a_path(tmp_path, overlay_clips):
    import torch
    from easyocr.craft import CRAFT

    torch.manual_seed(0)
    weights = tmp_path / "craft_mlt_25k.pth"
    torch.save(CRAFT().state_dict(), weights)
    config = TextAreaConfig(craft_weights=str(weights), det_long_side=256)
    assert config.resolved_backend() == "craft"  # 'auto' prefers the paper's detector when it has weights
    scorer = TextAreaScorer(config, device="cpu")
    assert scorer.describe()["backend"] == "craft"
    clips = [overlay_clips["large"][0], overlay_clips["none"][0]]
    rows = scorer.score(clips)
    again = scorer.score(clips[:1])
    assert [set(row) for row in rows] == [{"text_area"}, {"text_area"}]
    assert all(0.0 <= row["text_area"] <= 1.0 for row in rows)  # random weights: contract only
    assert again[0] == rows[0]


def test_craft_weights_come_from_easyocr_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EASYOCR_MODULE_PATH", str(tmp_path))
    assert TextAreaConfig().resolved_backend() == "ppocr"  # nothing there: the bundled PP-OCR detector
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "craft_mlt_25k.pth").write_bytes(b"placeholder")
    assert TextAreaConfig().resolved_backend() == "craft"


def test_missing_weights_name_the_setting(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"scorers\.text\.craft_weights"):
        TextAreaScorer(TextAreaConfig(backend="craft", craft_weights=str(tmp_path / "nope.pth")), device="cpu")
    with pytest.raises(MissingWeightsError, match=r"scorers\.text\.ppocr_det_model"):
        TextAreaScorer(TextAreaConfig(ppocr_det_model=str(tmp_path / "det.onnx")), device="cpu")
    with pytest.raises(ValueError, match=r"scorers\.text\.backend"):
        CurationConfig.from_overrides({"scorers": {"text": {"backend": "tesseract"}}})


class _PicklePayload:
    """Unpickling this runs os.mkdir(marker): the shape of a planted weights file that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_craft_weights_that_would_run_code_are_refused(tmp_path, monkeypatch):
    """A craft_mlt_25k.pth planted in EasyOCR's model dir (picked by 'auto') is refused; its payload never runs."""
    import torch
    from easyocr.craft import CRAFT

    marker = tmp_path / "payload-ran"
    state = CRAFT().state_dict()
    state["extra"] = _PicklePayload(marker)
    (tmp_path / "model").mkdir()
    torch.save(state, tmp_path / "model" / "craft_mlt_25k.pth")
    monkeypatch.setenv("EASYOCR_MODULE_PATH", str(tmp_path))
    config = TextAreaConfig()
    assert config.resolved_backend() == "craft"
    with pytest.raises(ValueError, match="refusing to load"):
        TextAreaScorer(config, device="cpu").score([text_clip("none", [])[0]])
    assert not marker.exists(), "the pickle's payload ran"
