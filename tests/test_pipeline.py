"""lvd-pipeline wiring: each step gets the previous step's outputs, reruns skip, changed upstream redoes.

The steps here are recording stand-ins with the subflows' signatures and return shapes (the real flows run
in tests/test_pipeline_e2e.py); they write the files the DAG reads (sources.parquet, summary.json,
done.json) the way the real flows do.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import CurateRequest
from dataformat import RunLayout
from evaluation.generated import FvdRequest
from flows.cli import main
from flows.ledger import Ledger
from flows.pipeline import (
    DagSteps,
    FvdOverrides,
    GenerateOverrides,
    PipelineRequest,
    fvd_request,
    generate_request,
    output_layout,
    run_dag,
)
from generation.generate import GenerateRequest
from training.request import StageRunRequest
from training.stages import FVD_PRESETS, GENERATE_PRESETS, STAGE_PRESETS


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def kwargs(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for called, kwargs in self.calls if called == name]

    def steps(self) -> DagSteps:
        def curate(request: CurateRequest) -> dict:
            input_path, output_path = request.input_path, request.output_path
            self.calls.append(("curate", dict(input_path=input_path, output_path=output_path,
                                              config=request.to_dict()["config"], ray_address=request.ray_address)))
            out = Path(output_path)
            sources = sorted(p.name for p in Path(input_path).glob("*.mp4"))
            (out / "sources.parquet").mkdir(parents=True, exist_ok=True)
            for source in sources:  # one committed part per source, named by its id, as curation writes them
                pq.write_table(pa.table({"source": [source]}), RunLayout(out).source_part(source))
            pq.write_table(pa.table({"clip_id": sources}), out / "manifest.parquet")
            (out / "summary.json").write_text(json.dumps({"sources": len(sources), "kept": len(sources)}))
            return {"sources": len(sources), "sources_error": 0, "clips": len(sources), "kept": len(sources)}

        def train(request: StageRunRequest) -> dict:
            stage, preset, max_steps, resume = request.stage, request.preset, request.max_steps, request.resume
            output_root = request.output_root
            self.calls.append(("train", dict(stage=stage, preset=preset, data=request.data,
                                             output_root=output_root, num_workers=request.num_workers, resume=resume,
                                             init=request.init, max_steps=max_steps, ray_address=request.ray_address)))
            out = Path(output_root) / f"stage{stage}"
            result = {"stage": stage, "preset": preset, "output_dir": str(out), "pipeline": str(out / "pipeline"),
                      "step": max_steps or 10, "losses": {"first": 1.0, "last": 0.5}}
            if resume and (out / "done.json").exists():
                return {**json.loads((out / "done.json").read_text()), "skipped": True}
            (out / "pipeline").mkdir(parents=True, exist_ok=True)
            (out / "done.json").write_text(json.dumps({**result, "run": len(self.calls)}))
            return {**result, "skipped": False}

        def evaluate(request: FvdRequest) -> dict:
            self.calls.append(("evaluate", request.to_dict()))
            output_dir = Path(request.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "shards").mkdir(exist_ok=True)
            (output_dir / "results.json").write_text("{}")
            return {"fvd": 123.4, "kvd": 0.5, "clipsim": None, "num_real": 3, "num_fake": request.num_videos}

        def generate(request: GenerateRequest) -> list[dict]:
            self.calls.append(("generate", request.to_dict()))
            output_dir = Path(request.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            results = []
            for index, prompt in enumerate(request.prompts or []):
                mp4 = output_dir / f"{index:03d}.mp4"
                mp4.write_bytes(b"video")
                results.append({"prompt": prompt, "mp4": str(mp4), "gif": str(mp4.with_suffix(".gif")),
                                "frames": request.num_frames})
            return results

        return DagSteps(curate=curate, train=train, evaluate=evaluate, generate=generate)


def _run(recorder: Recorder, raw: Path, root: Path, **overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = dict(input_path=str(raw), output_root=str(root), preset="tiny", num_workers=2,
                                  use_gpu=False, ray_address="ray://head:10001", curate_config={"clips": {}},
                                  max_steps=3, init=None, fvd_real_dir=str(raw), prompts=["a dog"])
    params.update(overrides)
    return run_dag(recorder.steps(), PipelineRequest.build(params), log=lambda line: None)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).write_bytes(b"x")
    return folder


def test_outputs_flow_from_step_to_step(raw, tmp_path):
    recorder, root = Recorder(), tmp_path / "run"
    record = _run(recorder, raw, root)
    layout = output_layout(root)
    assert recorder.names() == ["curate", "train", "train", "train", "evaluate", "generate"]

    (curate,) = recorder.kwargs("curate")
    assert curate["output_path"] == str(layout["curate"]) and curate["ray_address"] == "ray://head:10001"
    stages = recorder.kwargs("train")
    assert [s["stage"] for s in stages] == [1, 2, 3]
    assert all(s["data"] == curate["output_path"] for s in stages)
    assert all(s["output_root"] == str(layout["train"]) and s["num_workers"] == 2 for s in stages)
    assert all(s["max_steps"] == 3 and s["ray_address"] == "ray://head:10001" for s in stages)
    assert stages[0]["init"] is None
    assert stages[1]["init"] == str(layout["stage1_pipeline"])
    assert stages[2]["init"] == str(layout["stage2_pipeline"])
    (evaluate,) = recorder.kwargs("evaluate")
    (generate,) = recorder.kwargs("generate")
    assert evaluate["checkpoint"] == generate["checkpoint"] == str(layout["stage3_pipeline"])
    assert evaluate["real_dir"] == str(raw)
    assert evaluate["num_videos"] == 4 and evaluate["height"] == 64  # the tiny FVD preset
    assert evaluate["output_dir"] == str(layout["evaluate"]) and generate["output_dir"] == str(layout["generate"])
    assert generate["prompts"] == ["a dog"] and generate["num_frames"] == 14

    assert record["skipped"] == [] and record["fvd"]["fvd"] == 123.4
    assert record["checkpoints"]["stage3"] == str(layout["stage3_pipeline"])
    assert json.loads(layout["record"].read_text())["videos"][0]["mp4"] == str(layout["generate"] / "000.mp4")
    summary = layout["summary"].read_text()
    assert "| curate-lvd | ran |" in summary and "FVD 123.40" in summary


def test_rerun_skips_finished_steps_and_new_data_redoes_downstream(raw, tmp_path):
    recorder, root = Recorder(), tmp_path / "run"
    _run(recorder, raw, root)
    first_calls = len(recorder.calls)

    again = _run(recorder, raw, root)
    rerun = recorder.calls[first_calls:]
    assert [name for name, _ in rerun] == ["train", "train", "train"]  # each stage skips via its done.json
    assert all(kwargs["resume"] for _, kwargs in rerun)
    assert again["skipped"] == ["curate-lvd", "train-stage1", "train-stage2", "train-stage3", "evaluate-fvd",
                                "generate-video"]
    assert "| generate-video | skipped |" in output_layout(root)["summary"].read_text()

    # A new raw clip: curation runs, its data changed, so every stage retrains and FVD/videos are redone.
    (raw / "c.mp4").write_bytes(b"x")
    (output_layout(root)["evaluate"] / "shards" / "00000-00004.npz").write_bytes(b"stale")
    before = len(recorder.calls)
    third = _run(recorder, raw, root)
    assert [name for name, _ in recorder.calls[before:]] == ["curate", "train", "train", "train", "evaluate",
                                                             "generate"]
    assert not any(kwargs["resume"] for kwargs in recorder.kwargs("train")[-3:])
    assert third["skipped"] == []
    assert not (output_layout(root)["evaluate"] / "shards" / "00000-00004.npz").exists()


def test_changed_settings_redo_only_what_depends_on_them(raw, tmp_path):
    recorder, root = Recorder(), tmp_path / "run"
    _run(recorder, raw, root)
    before = len(recorder.calls)
    record = _run(recorder, raw, root, prompts=["a cat"])
    assert [name for name, _ in recorder.calls[before:]] == ["train", "train", "train", "generate"]
    assert "generate-video" not in record["skipped"] and "evaluate-fvd" in record["skipped"]


def test_interrupted_step_is_not_skipped(raw, tmp_path):
    recorder, root = Recorder(), tmp_path / "run"
    _run(recorder, raw, root)
    Ledger(output_layout(root)["root"]).write("evaluate-fvd", {"state": "started", "inputs": "x"})
    before = len(recorder.calls)
    _run(recorder, raw, root)
    assert "evaluate" in [name for name, _ in recorder.calls[before:]]


def test_bad_settings_are_named(raw, tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting fvd.num_vidoes; known: batch_size, clip_model"):
        _run(Recorder(), raw, tmp_path / "run", fvd={"num_vidoes": 3})
    with pytest.raises(ValueError, match="unknown setting generate.checkpoint"):  # the DAG's path, not a setting
        _run(Recorder(), raw, tmp_path / "run", generate={"checkpoint": "/elsewhere"})
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        _run(Recorder(), raw, tmp_path / "run", num_workers=0)
    with pytest.raises(ValueError, match="unknown setting curate_config.clips.min_clipz"):
        _run(Recorder(), raw, tmp_path / "run", curate_config={"clips": {"min_clipz": 1}})
    # checks across settings run when the request is built, before any step (nothing written)
    with pytest.raises(ValueError, match="fvd: num_frames must be >= 9 for I3D, got 4"):
        _run(Recorder(), raw, tmp_path / "early", fvd={"num_frames": 4})
    with pytest.raises(ValueError, match="generate: guidance must be 'w' or 'min,max'"):
        _run(Recorder(), raw, tmp_path / "early", generate={"guidance": "1,2,3"})
    assert not (tmp_path / "early").exists()


def test_stage3_finetunes_on_the_hq_subset_when_curation_selected_one(raw, tmp_path):
    recorder, root = Recorder(), tmp_path / "run"
    record = _run(recorder, raw, root)
    layout = output_layout(root)
    assert "no hq subset" in record["steps"][3]["outputs"]["data"]
    # The RAFT pass selected clips (as curate-lvd does with scorers.raft.weights): stage 3 trains on them,
    # and since the data changed every stage is trained again.
    hq = layout["curate"] / "hq"
    (hq / "shards").mkdir(parents=True)
    (hq / "shards" / "hq-000000.tar").write_bytes(b"")
    (hq / "summary.json").write_text(json.dumps({"selected": 1}))
    before = len(recorder.calls)
    _run(recorder, raw, root)
    stages = [kwargs for name, kwargs in recorder.calls[before:] if name == "train"]
    assert [s["data"] for s in stages] == [str(layout["curate"])] * 2 + [str(hq)]
    assert not any(s["resume"] for s in stages)


def test_demo_prints_where_every_output_is(raw, tmp_path, capsys):
    from flows.demo import DEMO_DEPLOYMENT, print_outputs

    assert DEMO_DEPLOYMENT == "lvd-pipeline/local"
    root = tmp_path / "demo-out"
    _run(Recorder(), raw, root)
    print_outputs(root)
    printed = capsys.readouterr().out
    layout = output_layout(root)
    for key in ("shards", "manifest", "stage1_pipeline", "stage2_pipeline", "stage3_pipeline", "train",
                "fvd_report", "summary"):
        assert str(layout[key]) in printed, key
    assert str(layout["generate"] / "000.mp4") in printed and "FVD:" in printed and "123.40" in printed
    assert f"tensorboard --logdir {layout['train']}" in printed


def _request(**overrides: Any) -> PipelineRequest:
    return PipelineRequest.build({"output_root": "/tmp/lvd-run", **overrides})


def test_presets_are_typed_settings_of_the_step_requests():
    """Every preset field lands on a setting of the same name and type in the step's request."""
    import dataclasses

    from common.requests import type_hints

    for presets, request_type in ((FVD_PRESETS, FvdRequest), (GENERATE_PRESETS, GenerateRequest)):
        hints = type_hints(request_type)
        for preset in presets.values():
            for f in dataclasses.fields(preset):
                assert f.name in hints, f.name
                assert type_hints(type(preset))[f.name] in (hints[f.name], *typing.get_args(hints[f.name])), f.name
    # an override section's fields: the request's, optional, with the request's bounds and help
    for section, request_type in ((FvdOverrides, FvdRequest), (GenerateOverrides, GenerateRequest)):
        targets = {f.name: f for f in dataclasses.fields(request_type)}
        for f in dataclasses.fields(section):
            assert {key: f.metadata[key] for key in ("help", "min", "max")} == \
                {key: targets[f.name].metadata[key] for key in ("help", "min", "max")}, f.name
            assert type_hints(section)[f.name] == type_hints(request_type)[f.name] | None, f.name
    assert set(FVD_PRESETS) | set(GENERATE_PRESETS) <= set(STAGE_PRESETS)


def test_tiny_preset_sets_the_step_requests_and_svd_keeps_the_papers_protocol():
    tiny = _request(preset="tiny", fvd_real_dir=None)
    fvd = fvd_request(tiny)
    assert (fvd.num_videos, fvd.batch_size, fvd.shard_size, fvd.steps, fvd.num_frames, fvd.height, fvd.width) == \
        (4, 2, 4, 2, 16, 64, 112)
    layout = output_layout("/tmp/lvd-run")
    assert fvd.real_dir == str(layout["fvd_real"]) and fvd.checkpoint == str(layout["stage3_pipeline"])
    assert fvd.output_dir == str(layout["evaluate"])
    generate = generate_request(tiny)
    assert (generate.num_frames, generate.height, generate.width, generate.steps) == (14, 96, 128, 8)
    assert generate.prompts == list(tiny.prompts) and generate.checkpoint == str(layout["stage3_pipeline"])

    svd = _request(preset="svd")
    assert fvd_request(svd).protocol() == FvdRequest(real_dir="x").protocol()  # the paper's: 13,320 at 320x576
    assert fvd_request(svd).num_videos == 13_320 and fvd_request(svd).shard_size == 64
    paper = generate_request(svd)
    assert (paper.num_frames, paper.height, paper.width, paper.steps) == (None, None, None, None)  # the mode's


def test_overrides_apply_on_top_of_the_preset(tmp_path):
    request = _request(preset="tiny", fvd_real_dir=str(tmp_path), fvd={"steps": "4", "dtype": "bfloat16"},
                       generate={"height": 64, "guidance": "1.0,3.0"})
    fvd, generate = fvd_request(request), generate_request(request)
    assert fvd.steps == 4 and fvd.dtype == "bfloat16" and fvd.num_videos == 4  # the rest stays the preset's
    assert fvd.real_dir == str(tmp_path)
    assert generate.height == 64 and generate.width == 128 and generate.guidance == "1.0,3.0"
    assert request.fvd == FvdOverrides(steps=4, dtype="bfloat16")
    again = PipelineRequest.build(json.loads(json.dumps(request.to_dict())))  # a flow's parameters round trip
    assert again == request and fvd_request(again) == fvd


def test_cli_reaches_the_sections_and_refuses_bad_ones_in_one_line(tmp_path, capsys, monkeypatch):
    import flows.pipeline as pipeline

    built: list[PipelineRequest] = []
    monkeypatch.setattr(pipeline, "_run", lambda request: built.append(request) or 0)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"fvd": {"num_videos": 6}, "generate": {"width": 96}}))
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--config", str(settings), "--set", "fvd.steps=4",
                 "--set", "generate.height=64", "--set", "curate_config.clips.min_clip_s=2.5"]) == 0
    (request,) = built
    assert (fvd_request(request).steps, fvd_request(request).num_videos) == (4, 6)
    assert (generate_request(request).height, generate_request(request).width) == (64, 96)
    assert request.curate_config.clips.min_clip_s == 2.5
    capsys.readouterr()

    for argv, expected in (
        (["--set", "fvd.bogus=1"], "unknown setting fvd.bogus; known: batch_size, clip_model"),
        (["--set", "generate.steps=0"], "setting generate.steps must be >= 1, got 0"),
        (["--set", "fvd.height=abc"], "setting fvd.height must be int, got 'abc'"),
        (["--set", "fvd.dtype=float13"], "fvd: setting dtype must be one of"),
    ):
        assert main(["pipeline", "--out", str(tmp_path / "run"), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lvd pipeline: error: ") and expected in lines[0], lines
    assert len(built) == 1  # no bad request reached the run
