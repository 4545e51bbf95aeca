"""Every bad input becomes an error row with a clear message; good sources in the same run are unaffected."""

from __future__ import annotations

import pytest

from curation.config import CurationConfig
from curation.dataset import curate_source, discover_sources, finalize, prepare_output
from dataformat import read_parquet_rows

EXPECTED = {
    "empty.mp4": "empty file (0 bytes)",
    "not_a_video.mp4": "not a readable video",
    "truncated.mp4": "not a readable video",
    "one_frame.mp4": "only 1 decodable frame",
    "tiny_8x8.mp4": "below the minimum side of 32 px",
    "broken_link.mp4": "unreadable path: broken symlink",
}


@pytest.fixture(scope="module")
def run_dir(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    config = CurationConfig()
    layout = prepare_output(out, config)
    for name in [*EXPECTED, "odd_161x97.mp4", "static_shot.mp4", "text_small.mp4"]:
        curate_source(sample_dir / "videos", name, out, config)
    finalize(layout, config)
    return out


def test_each_bad_input_is_an_error_row_with_its_reason(run_dir):
    rows = {row["source"]: row for row in read_parquet_rows(run_dir / "sources.parquet")}
    for name, fragment in EXPECTED.items():
        assert rows[name]["status"] == "error"
        assert fragment in rows[name]["error"], rows[name]["error"]
        assert rows[name]["cuts"] == []


def test_good_sources_in_the_same_run_are_curated(run_dir):
    rows = {row["source"]: row for row in read_parquet_rows(run_dir / "sources.parquet")}
    for name in ("odd_161x97.mp4", "static_shot.mp4", "text_small.mp4"):
        assert rows[name]["status"] == "ok" and rows[name]["error"] is None
    assert rows["odd_161x97.mp4"]["width"] == 161 and rows["odd_161x97.mp4"]["height"] == 97
    manifest = read_parquet_rows(run_dir / "manifest.parquet")
    assert {m["source"] for m in manifest} == {"odd_161x97.mp4", "static_shot.mp4", "text_small.mp4"}


def test_discovery_lists_only_video_files_and_missing_input_is_clear(sample_dir, tmp_path):
    found = list(discover_sources(sample_dir, CurationConfig().video_extensions))
    assert "ground_truth.json" not in found and "videos/bikes.mp4" in found
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(discover_sources(tmp_path / "nope", (".mp4",)))


def test_fsspec_url_input_is_discovered_and_downloaded(sample_dir, tmp_path):
    """Buckets go through fsspec; file:// exercises the same download path without a network."""
    url = f"file://{sample_dir / 'videos'}"
    config = CurationConfig()
    assert list(discover_sources(url, config.video_extensions)) == list(discover_sources(sample_dir / "videos",
                                                                                        config.video_extensions))
    prepare_output(tmp_path, config)
    row = curate_source(url, "static_shot.mp4", tmp_path, config)
    assert row["status"] == "ok" and row["num_clips"] == 1
    assert not any((tmp_path / "work" / "downloads").iterdir())  # the temporary copy is gone
    missing = curate_source(url, "no_such_file.mp4", tmp_path, config)
    assert missing["status"] == "error" and "unreadable path" in missing["error"]
