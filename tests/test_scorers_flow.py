"""The curate-lvd flow with every learned scorer on (tiny models saved to disk, the real PP-OCR detector):
Ray actor pools fed while sources decode, annotations in the manifest, the RAFT hq subset written as
its own shards, the LVD-F report and its Prefect artifact."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from dataformat import read_shard_samples
from tests.scorer_helpers import tiny_models, tiny_scorer_overrides

pytestmark = pytest.mark.slow

SOURCES = ("bikes.mp4", "text_big.mp4", "static_shot.mp4", "empty.mp4")


def test_flow_scores_filters_selects_hq_and_reports(prefect_api, ray_local, sample_dir, tmp_path):
    from flows.curate import curate_lvd

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in SOURCES:
        shutil.copy(sample_dir / "videos" / name, inputs / name)
    out = tmp_path / "out"
    scorers = tiny_scorer_overrides(tiny_models())
    scorers["raft"].update(hq_drop_low_motion_percent=50.0, hq_drop_low_aesthetic_percent=0.0, hq_max_text_area=0.5)
    report = curate_lvd(input_path=str(inputs), output_path=str(out), config={"scorers": scorers})
    assert report["sources_error"] == 1 and report["clips"] >= 5
    assert report["hq"]["selected"] == report["kept"] - report["kept"] // 2  # the less moving half is dropped

    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    for row in rows:
        assert row["text_area"] is not None and row["aesthetic_score"] is not None
        assert row["caption"] and row["captions"]["coca"] == row["caption"] and row["captions"]["video"] is None
        assert row["clip_score"] is not None and -1 <= row["clip_score"] <= 1
    titled = next(row for row in rows if row["source"] == "text_big.mp4")
    assert titled["text_area"] > 0.07 and "text_over_7pct" in titled["drop_reasons"]
    assert all(row["hq"] is False for row in rows if not row["keep"])
    hq_rows = {row["key"] for row in rows if row["hq"]}
    assert all(row["raft_motion"] is not None for row in rows if row["keep"])
    samples = [s for shard in sorted((out / "hq" / "shards").glob("hq-*.tar")) for s in read_shard_samples(shard)]
    assert {s["key"] for s in samples} == hq_rows
    assert all(s["json"]["hq"] is True and s["txt"] for s in samples)
    annotated = pq.read_table(out / "work" / "annotations").to_pylist()
    assert {a["clip_id"] for a in annotated} == {row["clip_id"] for row in rows}

    markdown = (out / "report.md").read_text()
    assert "| text_over_7pct |" in markdown and "Overlap between rules" in markdown
    assert (out / "report" / "hist_text_area.png").stat().st_size > 1000
    assert (out / "report" / "dropped_text_over_7pct.png").exists()

    import httpx

    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": ["lvd-f-report"]}}, "sort": "CREATED_DESC", "limit": 1})
    response.raise_for_status()
    assert response.json() and "What each rule removed" in response.json()[0]["data"]
