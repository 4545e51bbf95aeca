"""End to end: real Prefect server on loopback, `lvd serve`, `prefect deployment run curate-lvd/local`."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pyarrow.parquet as pq
import pytest

from dataformat import MANIFEST_COLUMNS, read_shard_samples
from tests.deployment_helpers import run_served_deployment

pytestmark = pytest.mark.slow


# Real cuts, a static shot the motion filter drops, a title card the OCR filter drops, and two bad files; the
# whole sample set is curated by the in-process fixture `curated_dir` and the Ray tests.
SUBSET = ("bikes.mp4", "static_shot.mp4", "text_big.mp4", "not_a_video.mp4", "empty.mp4")


def test_deployment_run_curates_sample_clips(prefect_api, sample_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in SUBSET:
        shutil.copy(sample_dir / "videos" / name, raw / name)
    out = tmp_path / "lvd-f"
    env = {**os.environ, "LVD_HOME": str(tmp_path / "home")}
    run_served_deployment("curate-lvd", ["--param", f"input_path={raw}", "--param", f"output_path={out}",
                                         "--param", "sources_per_task=2", "--param", "batches_in_flight=1"],
                          env, tmp_path, register_timeout_s=90, watch_timeout_s=400, timeout_s=450)

    # One task run per batch of sources, each named after its batch; the progress artifact reached 100%.
    subflow = httpx.post(f"{prefect_api}/flow_runs/filter", json={
        "flows": {"name": {"any_": ["curate-sources"]}}, "sort": "START_TIME_DESC", "limit": 1}).json()[0]
    task_runs = httpx.post(f"{prefect_api}/task_runs/filter",
                           json={"flow_runs": {"id": {"any_": [subflow["id"]]}}}).json()
    batches = sorted(run["name"] for run in task_runs if run["name"].startswith("curate batch "))
    assert batches == ["curate batch 1: bikes.mp4 +1", "curate batch 2: not_a_video.mp4 +1",
                       "curate batch 3: text_big.mp4"]
    assert all(run["state_type"] == "COMPLETED" for run in task_runs)
    progress = httpx.post(f"{prefect_api}/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["curate-progress"]}, "flow_run_id": {"any_": [subflow["id"]]}}}).json()
    assert [artifact["data"] for artifact in progress] == [100.0]

    sources = pq.read_table(out / "sources.parquet").to_pylist()
    assert len(sources) == len(SUBSET)
    assert {row["source"] for row in sources if row["status"] == "error"} == {"not_a_video.mp4", "empty.mp4"}
    bikes = next(row for row in sources if row["source"] == "bikes.mp4")
    assert bikes["num_frames"] == 250 and bikes["fps"] == 25.0 and len(bikes["cuts"]) == 5

    manifest = pq.read_table(out / "manifest.parquet")
    assert set(MANIFEST_COLUMNS) <= set(manifest.column_names)
    rows = manifest.to_pylist()
    kept = {row["key"]: row for row in rows if row["keep"]}
    assert kept and any(not row["keep"] and "static" in row["drop_reasons"] for row in rows)
    # PP-OCR ships real weights, so text area is scored by default; CLIP/CoCa need weights: null, never invented.
    assert all(isinstance(row["text_area"], float) for row in rows)
    assert all(row["caption"] is None and row["aesthetic_score"] is None for row in rows)
    title = next(row for row in rows if row["source"] == "text_big.mp4")
    assert title["text_area"] > 0.07 and "text_over_7pct" in title["drop_reasons"]

    samples = [s for shard in sorted((out / "shards").glob("*.tar")) for s in read_shard_samples(shard)]
    assert sorted(s["key"] for s in samples) == sorted(kept)
    for sample in samples:
        assert sample["mp4"][4:8] == b"ftyp"
        assert sample["json"]["clip_id"] == kept[sample["key"]]["clip_id"]
        assert sample["json"]["motion_score"] == pytest.approx(kept[sample["key"]]["motion_score"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources_error"] == 2 and summary["kept"] == len(kept)
