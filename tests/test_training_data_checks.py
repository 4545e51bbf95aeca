"""Bad training samples: found before Ray starts, skipped and counted by key, and past `max_bad_fraction` one line.

The shards are real WebDataset tars built from the curated sample clips, with the faults of issue 29: an empty tar,
a truncated tar, a `.mp4` member of random bytes, a `KEY.json` with a string where a number belongs, and a sample
with no video at all.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from dataformat import StageLayout, read_shard_samples
from flows.cli import main
from training import data as training_data
from training import loop
from training.data import BadTrainingData, SkipPolicy, TrainingStream, check_training_data
from training.loop import run_stage
from training.request import StageRunRequest
from training.stages import get_stage_preset

RANDOM_KEY, WRONG_TYPE_KEY, NO_VIDEO_KEY, CUT_KEY = "random-bytes", "fps-is-text", "json-only", "cut-off"


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, clip: dict, **meta) -> list[tuple[str, bytes]]:
    row = {**clip["json"], "key": key, **meta}
    return [(f"{key}.json", json.dumps(row).encode()), (f"{key}.mp4", clip["mp4"])]


@pytest.fixture(scope="module")
def clips(curated_dir: Path) -> list[dict]:
    shard = sorted((curated_dir / "shards").glob("*.tar"))[0]
    found = [sample for sample in read_shard_samples(shard) if sample["mp4"]]
    assert len(found) >= 2
    return found[:4]


@pytest.fixture
def bad_data(tmp_path: Path, clips: list[dict]) -> Path:
    """12 good samples in 3 shards, and the bad ones: an empty shard, a truncated shard (its 2nd sample cut off),
    a random-bytes .mp4, a KEY.json with fps as text, a sample with only a KEY.json."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        members = [m for i in range(4) for m in _sample(f"good-{shard}-{i}", clips[i % len(clips)])]
        _write_tar(folder / f"a-{shard}.tar", members)
    (folder / "b-empty.tar").write_bytes(b"")
    truncated = _write_tar(folder / "c-truncated.tar", _sample("kept-before-cut", clips[0]) + _sample(CUT_KEY, clips[1])
                           + _sample("after-cut", clips[0]))
    with tarfile.open(truncated) as archive:
        cut = archive.getmember(f"{CUT_KEY}.mp4")
        end = cut.offset_data + cut.size // 2
    os.truncate(truncated, end)
    _write_tar(folder / "d-faults.tar", [
        *_sample(RANDOM_KEY, {**clips[0], "mp4": os.urandom(len(clips[0]["mp4"]))}),
        *_sample(WRONG_TYPE_KEY, clips[0], fps="fast"),
        (f"{NO_VIDEO_KEY}.json", json.dumps(clips[0]["json"]).encode()),
        *_sample("good-d", clips[1]),
    ])
    return folder


def _shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def test_the_check_before_ray_names_exactly_the_bad_samples(bad_data: Path) -> None:
    check = check_training_data(_shards(bad_data), video_only=True, max_bad_fraction=1.0)
    named = {(Path(b.shard).name, b.key) for b in check.bad}
    assert named == {("b-empty.tar", None), ("c-truncated.tar", CUT_KEY), ("d-faults.tar", WRONG_TYPE_KEY),
                     ("d-faults.tar", NO_VIDEO_KEY)}
    reasons = {b.key: b.reason for b in check.bad}
    assert "'fps'" in reasons[WRONG_TYPE_KEY] and "'fast'" in reasons[WRONG_TYPE_KEY]
    assert "not a readable tar" in reasons[None] and "truncated" in reasons[CUT_KEY]
    assert "no video" in reasons[NO_VIDEO_KEY]
    keys = [s.key for s in check.samples]
    assert RANDOM_KEY in keys  # tar headers cannot tell: training skips it
    assert "kept-before-cut" in keys and "after-cut" not in keys and len(keys) == 12 + 1 + 2
    assert check.bad_count == 3 + 4  # an unreadable shard stands for the mean readable shard (4 samples)


def test_too_many_bad_samples_stop_the_stage_before_ray_in_one_line(bad_data: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray Train started")

    monkeypatch.setattr(loop, "_fit", no_ray)
    request = StageRunRequest.build({"stage": 2, "data": str(bad_data), "output_root": str(tmp_path / "runs"),
                                     "init": "tiny", "max_bad_fraction": 0.1})
    with pytest.raises(BadTrainingData) as raised:
        run_stage(request)
    message = str(raised.value)
    assert "\n" not in message and "7 of 22 training samples are bad before training" in message
    assert "b-empty.tar" in message and f"c-truncated.tar:{CUT_KEY}" in message and "max_bad_fraction 0.1" in message
    assert not request.directory.exists()  # refused before anything was written


def test_the_cli_says_it_in_one_line_with_exit_2(bad_data: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "--stage", "2", "--data", str(bad_data), "--output-root", str(tmp_path / "runs"),
                 "--init", "tiny", "--max-bad-fraction", "0.01"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lvd train: error: 7 of 22 training samples are bad") and "b-empty.tar" in lines[0]


class FitStarted(Exception):
    """Raised by the stand-in for Ray Train's fit: what run_stage handed to the workers has been captured."""


def _count_scans(monkeypatch) -> dict[str, int]:
    scans: dict[str, int] = {}
    real = training_data.scan_shard

    def counting(shard):
        scans[str(shard)] = scans.get(str(shard), 0) + 1
        return real(shard)

    monkeypatch.setattr(training_data, "scan_shard", counting)
    return scans


def _capture_fit(monkeypatch) -> list:
    handed: list = []

    def fit(config, *args, **kwargs):
        handed.append(config)
        raise FitStarted

    monkeypatch.setattr(loop, "_fit", fit)
    return handed


def test_each_shard_is_scanned_once_per_stage_run_and_the_workers_get_the_index(bad_data: Path, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """`lvd train` checks the request (CLI), the flow's validate task checks it again, then run_stage starts Ray:
    one scan of each shard for all three, and the workers read the samples the check kept instead of rescanning."""
    scans, handed = _count_scans(monkeypatch), _capture_fit(monkeypatch)
    request = StageRunRequest.build({"stage": 2, "data": str(bad_data), "output_root": str(tmp_path / "runs"),
                                     "init": "tiny", "max_bad_fraction": 0.5})
    request.check_inputs()  # the CLI's
    request.check_inputs()  # the flow's validate task
    with pytest.raises(FitStarted):
        run_stage(request)
    assert scans == {shard: 1 for shard in _shards(bad_data)}
    expected = check_training_data(_shards(bad_data), video_only=True, max_bad_fraction=1.0)
    assert [(s.key, s.members) for s in handed[0].samples] == [(s.key, s.members) for s in expected.samples]
    assert handed[0].skip_policy.known_bad == 7 and handed[0].skip_policy.total == 22
    # run_stage took the kept check: a later run (a Prefect retry) checks afresh
    scans.clear()
    with pytest.raises(FitStarted):
        run_stage(request)
    assert scans == {shard: 1 for shard in _shards(bad_data)}
    # a shard changed after the request's check (its mtime here): run_stage does not trust the kept check
    scans.clear()
    request.check_inputs()
    shard = _shards(bad_data)[0]
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))
    with pytest.raises(FitStarted):
        run_stage(request)
    assert scans == {shard: 2 for shard in _shards(bad_data)}


def _stream(samples, stage_dir: Path, max_bad_fraction: float, seed: int = 0) -> TrainingStream:
    preset = get_stage_preset(2, "tiny")
    policy = SkipPolicy(max_bad_fraction, 0, len(samples), str(stage_dir))
    return TrainingStream(samples, preset, seed, skip_policy=policy)


def test_an_undecodable_clip_is_skipped_counted_and_replaced_deterministically(bad_data: Path,
                                                                               tmp_path: Path) -> None:
    shard = str(bad_data / "d-faults.tar")
    samples = check_training_data([shard], video_only=True, max_bad_fraction=1.0).samples
    assert [s.key for s in samples] == [RANDOM_KEY, "good-d"]
    phase = get_stage_preset(2, "tiny").phases[0]
    stream = _stream(samples, tmp_path / "stage", max_bad_fraction=0.5)
    examples = [stream.example(position, phase)["key"] for position in range(4)]
    assert examples == ["good-d"] * 4  # the next sample of the epoch's order stands in
    assert list(stream.skipped) == [(shard, RANDOM_KEY)]
    records = list(StageLayout(tmp_path / "stage").skipped_samples.glob("*.json"))
    assert [entry["key"] for entry in json.loads(records[0].read_text())] == [RANDOM_KEY]
    again = _stream(samples, tmp_path / "again", max_bad_fraction=0.5)
    first = stream.example(1, phase)
    assert (again.example(1, phase)["pixels"] == first["pixels"]).all()  # same replacement, same frames


def test_undecodable_clips_past_the_fraction_stop_training_in_one_line(bad_data: Path, tmp_path: Path) -> None:
    shard = str(bad_data / "d-faults.tar")
    samples = check_training_data([shard], video_only=True, max_bad_fraction=1.0).samples
    phase = get_stage_preset(2, "tiny").phases[0]
    stream = _stream(samples, tmp_path / "stage", max_bad_fraction=0.1)
    with pytest.raises(BadTrainingData, match=f"1 of 2 training samples are bad in training .*{RANDOM_KEY}"):
        for position in range(2):
            stream.example(position, phase)
    failure = json.loads(StageLayout(tmp_path / "stage").data_failure.read_text())["error"]
    assert RANDOM_KEY in failure and "\n" not in failure


def test_a_workers_data_failure_comes_out_of_ray_as_its_one_line(bad_data: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Ray Train wraps a worker's error (TrainingFailedError, after its restarts); the driver raises the line the
    worker recorded instead, and the flow's retry condition does not retry it."""
    from prefect.states import Failed

    from flows.train import retry_machine_faults

    def worker_failed(config, *args, **kwargs):
        StageLayout(config.log_dir).data_failure.write_text(json.dumps({"error": "1 of 22 training samples ..."}))
        raise RuntimeError("TrainingFailedError: Training has failed after 3 attempts")

    monkeypatch.setattr(loop, "_fit", worker_failed)
    request = StageRunRequest.build({"stage": 2, "data": str(bad_data), "output_root": str(tmp_path / "runs"),
                                     "init": "tiny", "max_bad_fraction": 0.5})
    with pytest.raises(BadTrainingData, match=r"^1 of 22 training samples \.\.\.$") as raised:
        run_stage(request)
    assert not retry_machine_faults(None, None, Failed(data=raised.value))
    assert retry_machine_faults(None, None, Failed(data=RuntimeError("node lost")))


@pytest.mark.slow
def test_under_the_fraction_the_stage_trains_and_reports_the_bad_keys(bad_data: Path, tmp_path: Path,
                                                                      ray_local) -> None:
    """A real stage on Ray Train: the pre-Ray bad samples left out, the random-bytes clip skipped in training, all
    of them in done.json by key."""
    check = check_training_data(_shards(bad_data), video_only=True, max_bad_fraction=1.0)
    preset = get_stage_preset(2, "tiny")
    seed = next(seed for seed in range(100)  # a seed whose first step reads the random-bytes clip
                if RANDOM_KEY in {TrainingStream(check.samples, preset, seed).sample_at(p).key for p in (0, 1)})
    summary = run_stage(StageRunRequest.build({
        "stage": 2, "data": str(bad_data), "output_root": str(tmp_path / "runs"), "init": "tiny", "seed": seed,
        "max_steps": 2, "max_bad_fraction": 0.5, "max_failures": 0}))
    done = json.loads(Path(summary["output_dir"], "done.json").read_text())["bad_samples"]
    assert done["before_training"] == 7 and done["skipped_in_training"] == 1 and done["total"] == 22
    assert {(Path(s["shard"]).name, s["key"]) for s in done["samples"]} == {
        ("b-empty.tar", None), ("c-truncated.tar", CUT_KEY), ("d-faults.tar", WRONG_TYPE_KEY),
        ("d-faults.tar", NO_VIDEO_KEY), ("d-faults.tar", RANDOM_KEY)}


@pytest.mark.slow
def test_a_bad_clip_past_the_fraction_in_training_ends_the_ray_run_in_one_line(bad_data: Path, tmp_path: Path,
                                                                              ray_local) -> None:
    """7 of 22 bad before training passes max_bad_fraction 0.33; the random-bytes clip makes 8 in training: the
    stage ends with the worker's line, not Ray's wrapped error."""
    check = check_training_data(_shards(bad_data), video_only=True, max_bad_fraction=1.0)
    preset = get_stage_preset(2, "tiny")
    seed = next(seed for seed in range(100)
                if RANDOM_KEY in {TrainingStream(check.samples, preset, seed).sample_at(p).key for p in (0, 1)})
    request = StageRunRequest.build({
        "stage": 2, "data": str(bad_data), "output_root": str(tmp_path / "runs"), "init": "tiny", "seed": seed,
        "max_steps": 2, "max_bad_fraction": 0.33})
    with pytest.raises(BadTrainingData) as raised:
        run_stage(request)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("8 of 22 training samples are bad in training")
    assert f"d-faults.tar:{RANDOM_KEY}" in message
    assert not StageLayout(request.directory).done.exists()


@pytest.fixture
def corrupt_clips(tmp_path: Path, clips: list[dict]) -> Path:
    """Valid tars of valid `KEY.json`s, half of whose `KEY.mp4` are random bytes: the pre-Ray check passes them
    (tar headers and JSON cannot tell), training finds them."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for shard in range(2):
        members = [m for i in range(2) for m in _sample(f"good-{shard}-{i}", clips[i % len(clips)])]
        members += [m for i in range(2) for m in _sample(f"garbage-{shard}-{i}",
                                                           {**clips[i], "mp4": os.urandom(len(clips[i]["mp4"]))})]
        _write_tar(folder / f"s-{shard}.tar", members)
    return folder


def _train_attempts(started_ns: int) -> int:
    """Ray Train's worker-group starts (attempts) of the runs started since `started_ns`, from its state actor."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    assert actor is not None, "Ray Train's state tracking is off"
    runs = ray.get(actor.get_train_runs.remote())
    attempts = ray.get(actor.get_train_run_attempts.remote())
    ours = [run_id for run_id, run in runs.items() if run.start_time_ns >= started_ns]
    assert len(ours) == 1, ours
    return len(attempts.get(ours[0], {}))


@pytest.mark.slow
def test_corrupt_clips_past_the_fraction_end_the_stage_without_a_ray_restart(corrupt_clips: Path, tmp_path: Path,
                                                                            ray_local, monkeypatch) -> None:
    """Two workers; the seed puts a corrupt clip in rank 1's first step and a good one in rank 0's. Rank 1's stream
    stops past max_bad_fraction, rank 0 learns it at the step's flag all-reduce, both return: Ray Train starts
    the worker group once (with max_failures 2 it would restart a failed one twice) and the driver raises the one
    line naming the shard and key."""
    import time

    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    check = check_training_data(_shards(corrupt_clips), video_only=True, max_bad_fraction=0.0)
    assert not check.bad and len(check.samples) == 8  # the pre-Ray check cannot tell
    preset = get_stage_preset(2, "tiny")
    seed = next(seed for seed in range(100)
                if [TrainingStream(check.samples, preset, seed).sample_at(p).key.startswith("garbage")
                    for p in (0, 1)] == [False, True])
    bad_key = TrainingStream(check.samples, preset, seed).sample_at(1).key
    request = StageRunRequest.build({
        "stage": 2, "data": str(corrupt_clips), "output_root": str(tmp_path / "runs"), "init": "tiny", "seed": seed,
        "max_steps": 2, "num_workers": 2, "micro_batch_size": 1, "max_bad_fraction": 0.1, "max_failures": 2})
    started = time.time_ns()
    with pytest.raises(BadTrainingData) as raised:
        run_stage(request)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("1 of 8 training samples are bad in training"), message
    assert f"s-{bad_key.split('-')[1]}.tar:{bad_key}" in message
    assert _train_attempts(started) == 1
    assert not StageLayout(request.directory).done.exists()
