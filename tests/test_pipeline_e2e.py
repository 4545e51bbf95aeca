"""The whole DAG end to end: `lvd serve` + a real Prefect server + `prefect deployment run lvd-pipeline/local`.

Two real sample videos, the tiny preset cut to 2 optimizer steps per stage: curation on local Ray, three
Ray Train stages, FVD with the real I3D, generation. Every output is then opened with the tools a user
would use (webdataset, pyarrow, DuckDB, diffusers-style from_pretrained, PyAV, TensorBoard's event
files), the subflow runs are looked up on the server, and a rerun must skip every step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.deployment_helpers import run_served_deployment

pytestmark = pytest.mark.slow

SUBFLOWS = ["curate-lvd", "train-stage", "train-stage", "train-stage", "evaluate-fvd", "generate-video"]


def _subflows_of_pipeline_run(api_url: str) -> tuple[dict, list[str]]:
    """The lvd-pipeline run and the flow names of its subflow runs, read from the server's REST API."""
    runs = httpx.post(f"{api_url}/flow_runs/filter", json={"limit": 200}).json()
    names = {run["flow_id"]: httpx.get(f"{api_url}/flows/{run['flow_id']}").json()["name"] for run in runs}
    (parent,) = [run for run in runs if names[run["flow_id"]] == "lvd-pipeline"]
    children = []
    for run in runs:
        if run["parent_task_run_id"]:
            task_run = httpx.get(f"{api_url}/task_runs/{run['parent_task_run_id']}").json()
            if task_run["flow_run_id"] == parent["id"]:
                children.append(names[run["flow_id"]])
    return parent, children


def test_whole_dag_through_a_real_prefect_server(prefect_api, sample_dir, tmp_path):
    import av
    import duckdb
    import webdataset as wds

    from flows.pipeline import STAGES, lvd_pipeline, output_layout

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("bikes.mp4", "static_shot.mp4"):  # real shot cuts + a static shot the motion filter drops
        shutil.copy(sample_dir / "videos" / name, raw / name)
    root = tmp_path / "run"
    params = {"input_path": str(raw), "output_root": str(root), "max_steps": 2, "prompts": ["a cyclist"]}
    from evaluation.i3d import ensure_i3d_weights

    # A cache root of its own (the sample set), with the I3D weights already converted in the default one.
    env = {**os.environ, "LVD_HOME": str(tmp_path / "home"), "LVD_I3D_WEIGHTS": str(ensure_i3d_weights()),
           "OMP_NUM_THREADS": "2"}
    run_served_deployment("lvd-pipeline", ["--params", json.dumps(params)], env, tmp_path,
                          register_timeout_s=120, watch_timeout_s=480, timeout_s=540)

    paths = output_layout(root)
    record = json.loads(paths["record"].read_text())
    assert [step["name"] for step in record["steps"]] == ["curate-lvd", "train-stage1", "train-stage2",
                                                          "train-stage3", "evaluate-fvd", "generate-video"]
    assert record["skipped"] == []

    # Every step is a subflow run of the parent on the server (what the UI shows).
    parent, children = _subflows_of_pipeline_run(prefect_api)
    assert parent["state"]["type"] == "COMPLETED"
    assert sorted(children) == sorted(SUBFLOWS)
    artifacts = {a["key"] for a in httpx.post(f"{prefect_api}/artifacts/filter", json={"limit": 200}).json()}
    assert {f"train-stage-{stage}-{kind}" for stage in STAGES for kind in ("report", "progress")} <= artifacts

    # Shards: plain webdataset; manifest: pyarrow and DuckDB.
    manifest = pq.read_table(paths["manifest"]).to_pylist()
    kept = {row["key"] for row in manifest if row["keep"]}
    assert len(kept) >= 2 and len(kept) < len(manifest)
    shards = sorted(str(p) for p in paths["shards"].glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert {s["__key__"] for s in samples} == kept
    assert all(s["mp4"][4:8] == b"ftyp" and json.loads(s["json"])["keep"] for s in samples)
    ((count,),) = duckdb.sql(f"select count(*) from read_parquet('{paths['manifest']}') where keep").fetchall()
    assert count == len(kept)

    # Checkpoints: each stage's pipeline loads; stage N started from stage N-1's; TensorBoard event files.
    from model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained(paths["stage3_pipeline"])
    assert pipe.unet.config.cross_attention_dim == 64  # the tiny preset
    unets = [load_file(str(paths[f"stage{stage}_pipeline"] / "unet" / "diffusion_pytorch_model.safetensors"))
             for stage in STAGES]
    for before, after in zip(unets[:-1], unets[1:], strict=True):  # each stage trained on top of the last
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    for stage in STAGES:
        assert list(paths[f"stage{stage}_tensorboard"].rglob("events.out.tfevents.*")), stage
        lineage = json.loads((paths[f"stage{stage}"] / "lineage.json").read_text())
        assert lineage["data"] == str(paths["curate"])
        if stage > 1:
            assert lineage["init"] == str(paths[f"stage{stage - 1}_pipeline"])
            assert lineage["parent"]["stage"] == stage - 1

    # FVD: a finite number against the labelled smoke-test reference; the generated MP4 decodes.
    results = json.loads(paths["fvd_report"].read_text())
    assert math.isfinite(results["fvd"]) and results["fvd"] == pytest.approx(record["fvd"]["fvd"])
    assert results["settings"]["checkpoint"] == str(paths["stage3_pipeline"])
    assert results["num_real"] == len(kept) and "NOT UCF-101" in record["fvd"]["real_set"]
    (video,) = record["videos"]
    with av.open(video["mp4"]) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 14 and frames[0].shape == (96, 128, 3)
    summary = paths["summary"].read_text()
    assert "NOT UCF-101" in summary and "| generate-video | ran |" in summary

    # Rerun (in this process, same server): every step is skipped and nothing is rewritten.
    done_before = (paths["stage3"] / "done.json").stat().st_mtime_ns
    mp4_before = Path(video["mp4"]).read_bytes()
    again = lvd_pipeline(**params)
    assert again["skipped"] == ["curate-lvd", "train-stage1", "train-stage2", "train-stage3", "evaluate-fvd",
                                "generate-video"]
    assert (paths["stage3"] / "done.json").stat().st_mtime_ns == done_before
    assert Path(video["mp4"]).read_bytes() == mp4_before
    assert again["fvd"]["fvd"] == pytest.approx(results["fvd"])
