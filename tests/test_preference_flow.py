"""The `evaluate-preference` flow end to end (real local Prefect server): two generation runs of tiny checkpoints
become a study paired by their generation records, a scripted rater votes through the HTTP API while the flow
serves, and the flow reports once every pair has its votes."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from dataformat.preference import StudyLayout, read_study
from flows.study import evaluate_preference
from generation.generate import GenerateRequest, generate_video_files
from model.pipeline import TextToVideoPipeline
from tests.preference_helpers import http


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rate_everything(base: str, rater: str, gold_side: dict, errors: list) -> None:
    """Vote until done: the untouched side of gold pairs, else always left."""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                status, pair = http(f"{base}/api/next?rater={rater}")
            except OSError:  # the flow has not started serving yet
                time.sleep(0.2)
                continue
            if pair["done"]:
                return
            for axis in pair["axes"]:
                choice = gold_side.get(pair["pair"], "left")
                vote = {"pair": pair["pair"], "rater": rater, "axis": axis, "choice": choice}
                assert http(f"{base}/api/votes", vote)[0] == 200
        errors.append("the rater ran out of time")
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(repr(error))


def test_flow_builds_serves_and_reports_a_study_of_two_generation_runs(prefect_api, tmp_path):
    import torch

    torch.set_num_threads(1)
    runs = {}
    for name, seed in (("first", 1), ("second", 2)):
        TextToVideoPipeline.from_preset("tiny", seed=seed).save_pretrained(tmp_path / f"ckpt-{name}")
        generate_video_files(GenerateRequest(output_dir=str(tmp_path / name), prompts=["a cyclist", "a rabbit"],
                                             checkpoint=str(tmp_path / f"ckpt-{name}"), num_frames=6, steps=2),
                             progress=False)
        runs[name] = tmp_path / name
    (tmp_path / "second" / "000.json").rename(tmp_path / "second" / "keep.json")  # names differ across runs:
    (tmp_path / "second" / "000.mp4").rename(tmp_path / "second" / "keep.mp4")  # the records still pair them
    (tmp_path / "second" / "000.gif").unlink()
    port, study = free_port(), tmp_path / "study"
    errors: list = []

    def rater() -> None:
        while not StudyLayout(study).study.exists():
            time.sleep(0.1)
        gold = {pair.id: pair.gold for pair in read_study(StudyLayout(study))[1] if pair.gold}
        rate_everything(f"http://127.0.0.1:{port}", "ann", gold, errors)

    thread = threading.Thread(target=rater, daemon=True)
    thread.start()
    summary = evaluate_preference(systems=[f"{name}={folder}" for name, folder in runs.items()],
                                  output_dir=str(study), axes="quality,prompt", gold=1, port=port, votes_per_pair=1,
                                  poll_seconds=0.2, max_wait_minutes=4, bootstrap_rounds=20)
    thread.join(timeout=60)
    assert not errors, errors
    assert summary["collection"]["complete"] is True and summary["pairing"] == "metadata"
    rows = {axis: result["pairs"][0] for axis, result in summary["by_axis"].items()}
    _, pairs = read_study(StudyLayout(study))
    first_left = sum(1 for pair in pairs if pair.gold is None and pair.left == "first")
    assert rows["quality"]["votes"] == 2 and rows["quality"]["wins_a"] == first_left  # "left" always won
    assert summary["raters"][0]["gold_accuracy"] == 1.0
    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["evaluate-preference"]}}, "sort": "CREATED_DESC", "limit": 1})
    artifact = response.json()[0]["data"]
    assert "data:image/png;base64," in artifact and "| first | second | 2 |" in artifact
