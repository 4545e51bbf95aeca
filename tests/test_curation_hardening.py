"""Inputs and faults that must not corrupt a curation run (docs/operations.md, "Guarantees"), on real sample footage and
files derived from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import task

from curation.config import CurationConfig
from curation.dataset import curate_source, finalize, prepare_output, stage_sources
from dataformat import read_parquet_rows, source_id


def corrupt_copy(source: Path, target: Path, count: int = 64) -> Path:
    """`source` with `count` bytes in the middle of the file inverted: H.264 data the decoder conceals."""
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    target.write_bytes(bytes(data))
    return target


def test_clips_with_frames_the_decoder_concealed_are_dropped_with_a_reason(sample_dir, tmp_path):
    """64 flipped bytes mid-file decode without an exception; the frame is flagged corrupt and its group of
    pictures carries the broken blocks: every clip overlapping it is dropped ('decode_errors'), the others of
    the same file are unaffected."""
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copyfile(sample_dir / "videos" / "bikes.mp4", videos / "bikes.mp4")
    corrupt_copy(sample_dir / "videos" / "bikes.mp4", videos / "bikes_corrupt.mp4")
    out = tmp_path / "out"
    config = CurationConfig.from_overrides({"dedup": {"enabled": False}})  # the copy's clips are near-duplicates
    layout = prepare_output(out, config)
    for name in ("bikes.mp4", "bikes_corrupt.mp4"):
        assert curate_source(videos, name, out, config)["status"] == "ok"
    summary = finalize(layout, config)
    manifest = read_parquet_rows(out / "manifest.parquet")
    clean = {(r["start_frame"], r["end_frame"]): r for r in manifest if r["source"] == "bikes.mp4"}
    damaged = {(r["start_frame"], r["end_frame"]): r for r in manifest if r["source"] == "bikes_corrupt.mp4"}
    assert clean.keys() == damaged.keys()
    broken = {span for span, row in damaged.items() if "decode_errors" in row["drop_reasons"]}
    # bikes.mp4: keyframes at 0, 30, 76, 137, 187, 242; the flipped bytes fall in frame 124's data
    assert broken and all(start >= 76 and end <= 137 for start, end in broken), broken
    assert all(not damaged[span]["keep"] and damaged[span]["shard"] is None for span in broken)
    # an exact copy would carry the damage for another decoder to conceal its own way: re-encoded as ours saw it
    assert all(damaged[span]["clip_method"] == "reencode" for span in broken)
    assert all(damaged[span]["clip_method"] == "exact-copy" for span in damaged.keys() - broken)
    assert all(damaged[span]["drop_reasons"] == clean[span]["drop_reasons"] for span in damaged.keys() - broken)
    assert not any("decode_errors" in row["drop_reasons"] for row in clean.values())
    outcome = next(rule for rule in summary["rules"] if rule["name"] == "decode_errors")
    assert outcome["dropped"] == len(broken)


# Two names whose SHA-1 digests share their first 12 hex digits (found by a birthday search over 24 million
# names): with 48-bit ids they were one source, and one of them silently replaced the other.
COLLIDING_48_BIT = ("take_9180950.mp4", "take_18012514.mp4")


def test_sources_whose_short_ids_collide_are_both_curated(sample_dir, tmp_path):
    import hashlib

    assert len({hashlib.sha1(name.encode()).hexdigest()[:12] for name in COLLIDING_48_BIT}) == 1
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copyfile(sample_dir / "videos" / "static_shot.mp4", videos / COLLIDING_48_BIT[0])
    shutil.copyfile(sample_dir / "videos" / "text_small.mp4", videos / COLLIDING_48_BIT[1])
    out = tmp_path / "out"
    config = CurationConfig()
    layout = prepare_output(out, config)
    for name in COLLIDING_48_BIT:
        curate_source(videos, name, out, config)
    finalize(layout, config)
    sources = read_parquet_rows(out / "sources.parquet")
    assert sorted(row["source"] for row in sources) == sorted(COLLIDING_48_BIT)
    clips = read_parquet_rows(out / "manifest.parquet")
    assert {row["source"] for row in clips} == set(COLLIDING_48_BIT)
    assert len({row["clip_id"] for row in clips}) == len(clips)


def test_one_writer_per_output_directory(sample_dir, tmp_path):
    """A second run into an OUT that a live process writes stops with a one-line error naming the holder and
    touches nothing (it used to delete the first run's shard staging folder); a dead holder's lock is taken
    over."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    from dataformat import LOCK_NAME
    from infra.output_lock import release_output_lock

    out = tmp_path / "out"
    prepare_output(out, CurationConfig())  # this process is now OUT's writer
    staging = out / "shards" / ".shards-staging-abc"  # the first run is writing shards
    staging.mkdir(parents=True)
    code = f"from curation.dataset import run_sequential; run_sequential({str(sample_dir / 'videos')!r}, {str(out)!r})"
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert second.returncode != 0
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("infra.output_lock.OutputLocked:"), second.stderr[-2000:]
    assert f"pid {os.getpid()} on {socket.gethostname()}" in error
    assert staging.is_dir() and not (out / "sources.parquet").exists()

    release_output_lock(out)
    assert not (out / LOCK_NAME).exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                             "started": time.time() - 60, "process_started": time.time() - 61}))
    prepare_output(out, CurationConfig())  # the killed run's lock is taken over
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_output_lock(out)


def test_a_rerun_with_other_settings_is_refused_unless_finalize_recomputes_them(sample_dir, tmp_path):
    """Settings that shape committed sources cannot change on a rerun (it used to report '1 already done'
    while config.json claimed the new value); filter and shard settings, applied afresh, can."""
    import json

    from curation.dataset import run_sequential

    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copyfile(sample_dir / "videos" / "static_shot.mp4", videos / "static_shot.mp4")
    out = tmp_path / "out"
    run_sequential(videos, out)
    recorded = (out / "config.json").read_text()
    changed = CurationConfig.from_overrides({"decode": {"min_side": 64}, "clips": {"min_clip_s": 2.0}})
    with pytest.raises(ValueError, match=r"clips\.min_clip_s: 1\.0 -> 2\.0; decode\.min_side: 32 -> 64") as error:
        run_sequential(videos, out, changed)
    assert "\n" not in str(error.value) and "new output directory" in str(error.value)
    assert (out / "config.json").read_text() == recorded
    # filters are applied afresh to every committed clip: a rerun may change them, and the outputs follow
    no_filters = CurationConfig.from_overrides({"filters": [], "decode": {"threads": 1}})
    summary = run_sequential(videos, out, no_filters)
    assert summary["kept"] == summary["clips"] > 0
    assert json.loads((out / "config.json").read_text())["filters"] == []


_LIMITED_WRITER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
from curation.config import CurationConfig
from curation.dataset import curate_source, prepare_output
videos, out, name, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = CurationConfig()
prepare_output(out, config)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if name == "--report":
    from curation.report import write_report
    write_report(out, config)
else:
    print(curate_source(videos, name, out, config)["status"])
"""


def _limited(videos: Path, out: Path, name: str, limit: int) -> subprocess.CompletedProcess:
    """Run one step in a process whose writes fail (EFBIG) past `limit` bytes per file: a real OS write fault."""
    return subprocess.run([sys.executable, "-c", _LIMITED_WRITER, str(videos), str(out), name, str(limit)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_a_storage_fault_leaves_the_source_uncommitted_and_a_rerun_retries_it(sample_dir, tmp_path):
    """Clip files that cannot be written (the OS refuses the write) are not the input's fault: no error row is
    committed, the step fails naming the source, and a rerun once the fault is gone curates it."""
    videos, out = sample_dir / "videos", tmp_path / "out"
    failed = _limited(videos, out, "bikes.mp4", 20_000)
    assert failed.returncode != 0
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("curation.decode.StorageFault:") and "'bikes.mp4'" in error and "File too large" in error
    assert not list(out.glob("sources.parquet/*.parquet")), "a machine fault was committed as the source's result"
    rows = read_parquet_rows(out / "sources.parquet")
    assert rows == []
    retried = curate_source(videos, "bikes.mp4", out, CurationConfig())
    assert retried["status"] == "ok" and retried["num_clips"] > 0


def test_report_figures_that_cannot_be_written_fail_the_report(curated_dir, tmp_path):
    """A contact sheet the OS refuses to write used to be skipped silently; now the report step fails."""
    out = tmp_path / "run"
    shutil.copytree(curated_dir, out, symlinks=True)
    (out / ".lvd-lock").unlink(missing_ok=True)
    # 20 kB: the histograms (~10 kB) and report.md (~3 kB) fit, the contact sheet (~34 kB) does not
    failed = _limited(out, out, "--report", 20_000)
    assert failed.returncode != 0 and "File too large" in failed.stderr.strip().splitlines()[-1], failed.stderr[-1500:]


@pytest.mark.parametrize(("override", "message"), [
    ({"decode": {"min_side": -5}}, "setting decode.min_side must be >= 1, got -5"),
    ({"shards": {"max_samples": 0}}, "setting shards.max_samples must be >= 1, got 0"),
    ({"decode": {"max_pixels": 0}}, "setting decode.max_pixels must be >= 1, got 0"),
    ({"clips": {"reencode_crf": 99}}, "setting clips.reencode_crf must be <= 51, got 99"),
    ({"clips": {"min_clip_s": 3.0, "max_clip_s": 2.0}}, "setting clips.max_clip_s must be >= 3, got 2.0"),
])
def test_numeric_settings_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as error:
        CurationConfig.from_overrides(override)
    assert str(error.value) == message


def _numeric_settings(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, number type) of every int/float setting under the dataclass `cls` (None-able ones and
    tuples of numbers included), found by walking its fields: a setting added later is covered too."""
    import dataclasses
    import types
    import typing

    from common.requests import type_hints

    found = []
    for name, hint in type_hints(cls).items():
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            found += _numeric_settings(hint, f"{prefix}{name}.")
        elif hint in (int, float):
            found.append((f"{prefix}{name}", hint))
    return found


def test_every_numeric_setting_rejects_a_bad_value_in_one_line_naming_it():
    """Each int/float setting of CurationConfig (scorers and their actor pools included): a huge negative value,
    and NaN for the floats (it compared as in range), is a one-line error naming the setting."""
    settings = _numeric_settings(CurationConfig)
    assert len(settings) > 80 and "scorers.raft.pool.batch_size" in dict(settings)
    for name, kind in settings:
        for bad in (-(10**9), float("nan")) if kind is float else (-(10**9),):
            *parents, leaf = name.split(".")
            override: dict = {leaf: [bad] if name == "cuts.dissolve_lengths" else bad}
            for parent in reversed(parents):
                override = {parent: override}
            with pytest.raises(ValueError) as error:
                CurationConfig.from_overrides(override)
            assert name in str(error.value) and "\n" not in str(error.value), (name, bad, str(error.value))
    for value in (float("nan"), -1.0):
        rule = {"name": "static", "column": "motion_score", "mode": "percentile", "drop": "low", "value": value}
        with pytest.raises(ValueError, match="filter rule 'static'"):
            CurationConfig.from_overrides({"filters": [rule]})


def test_sources_above_the_pixel_limit_are_refused_with_a_message_that_names_it(sample_dir, tmp_path):
    from curation.config import MAX_PIXELS_8K

    assert CurationConfig().decode.max_pixels == MAX_PIXELS_8K == 7680 * 4320
    config = CurationConfig.from_overrides({"decode": {"max_pixels": 1280 * 720 - 1}})
    out = tmp_path / "out"
    prepare_output(out, config)
    row = curate_source(sample_dir / "videos", "bigbuckbunny.mp4", out, config)  # 1280x720
    assert row["status"] == "error"
    assert row["error"] == ("resolution 1280x720 (0.9 megapixels) exceeds decode.max_pixels=921599 "
                            "(0.9 megapixels; default 8K UHD)")
    assert curate_source(sample_dir / "videos", "cuts_hard.mp4", out, config)["status"] == "ok"  # 640x360


def _vfr_remux(source: Path, target: Path, switch: int = 77) -> list[float]:
    """`source` re-encoded with frames 40 ms apart before frame `switch` and 100 ms apart after it (a
    variable-frame-rate file, as phones record); returns each frame's presentation time in seconds."""
    from fractions import Fraction

    import av

    times: list[float] = []
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        stream = writer.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        milliseconds = 0
        for index, frame in enumerate(reader.decode(video=0)):
            image = frame.to_ndarray(format="rgb24")
            out = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            out.pts, out.time_base = milliseconds, Fraction(1, 1000)
            times.append(milliseconds / 1000)
            writer.mux(stream.encode(out))
            milliseconds += 40 if index < switch else 100
        writer.mux(stream.encode(None))
    return times


def test_clip_times_of_a_variable_frame_rate_source_follow_its_timestamps(sample_dir, tmp_path):
    """start_s/end_s come from presentation timestamps, not frame / average fps (17 % off on such a file)."""
    videos = tmp_path / "in"
    videos.mkdir()
    times = _vfr_remux(sample_dir / "videos" / "cuts_hard.mp4", videos / "vfr.mp4")
    out = tmp_path / "out"
    config = CurationConfig()
    prepare_output(out, config)
    assert curate_source(videos, "vfr.mp4", out, config)["status"] == "ok"
    clips = read_parquet_rows(out / "work" / "clip_rows")
    assert clips and any(clip["start_frame"] > 77 for clip in clips)
    for clip in clips:
        assert clip["start_s"] == pytest.approx(times[clip["start_frame"]], abs=1e-3), clip
        expected_end = times[clip["end_frame"]] if clip["end_frame"] < len(times) else times[-1] + 0.1
        assert clip["end_s"] == pytest.approx(expected_end, abs=1e-3), clip


def test_a_file_name_that_is_not_utf8_becomes_a_row_and_the_run_completes(sample_dir, tmp_path):
    """b'caf\\xe9.mp4' (Latin-1 bytes) used to stop the whole run; it is curated like any file, named with an
    escape in the tables, carried through Prefect parameters (JSON) and done exactly once on a rerun."""
    import json

    from curation.dataset import run_sequential
    from dataformat import native_source, portable_source

    videos = tmp_path / "in"
    videos.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.mp4")
    shutil.copyfile(sample_dir / "videos" / "static_shot.mp4", videos / latin1)
    shutil.copyfile(sample_dir / "videos" / "empty.mp4", videos / os.fsdecode(b"bad\xff.mp4"))
    shutil.copyfile(sample_dir / "videos" / "text_small.mp4", videos / "plain.mp4")
    out = tmp_path / "out"
    summary = run_sequential(videos, out)
    rows = {row["source"]: row for row in read_parquet_rows(out / "sources.parquet")}
    assert rows.keys() == {"caf\\xe9.mp4", "bad\\xff.mp4", "plain.mp4"}
    assert rows["caf\\xe9.mp4"]["status"] == "ok" and rows["plain.mp4"]["status"] == "ok"
    assert rows["bad\\xff.mp4"]["status"] == "error" and "empty file" in rows["bad\\xff.mp4"]["error"]
    manifest = read_parquet_rows(out / "manifest.parquet")
    assert summary["clips"] > 0 and "caf\\xe9.mp4" in {row["source"] for row in manifest}
    committed = {part: part.stat().st_mtime_ns for part in (out / "sources.parquet").glob("part-*.parquet")}
    assert run_sequential(videos, out)["sources"] == 3  # a rerun finds every source done and redoes none
    assert {part: part.stat().st_mtime_ns for part in (out / "sources.parquet").glob("part-*.parquet")} == committed
    carried = json.loads(json.dumps(portable_source(latin1)))  # what a Prefect parameter goes through
    assert carried.isascii() and native_source(carried) == latin1 and portable_source("plain.mp4") == "plain.mp4"


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_an_output_path_that_cannot_hold_a_run_is_a_one_line_error_with_exit_code_2(sample_dir, tmp_path):
    """A file, or a path under /proc, used to end in a 130-160 line traceback after services started."""
    from curation.dataset import OutputPathError

    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cases = ((a_file, "is a file, not a directory"), (Path("/proc/lvd-out"), "a virtual file system"))
    running = [subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(sample_dir / "videos"), str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for out, _ in cases]  # side by side: each pays the CLI's start-up
    for (out, reason), process in zip(cases, running, strict=True):
        _, stderr = process.communicate(timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip() == f"lvd curate: output path {out} {reason}" or (
            len(result.stderr.strip().splitlines()) == 1 and reason in result.stderr), result.stderr[-2000:]
        with pytest.raises(OutputPathError, match=reason):
            prepare_output(out, CurationConfig())
    assert a_file.read_text() == "not a directory"


@task(name="curate-batch")
def _curate_batch_whose_decoder_crashes(input_path: str, relative_paths: list[str], label: str, output_path: str,
                                        config: CurationConfig, driver: dict) -> list[dict]:
    """The real batch task, except that for `crash*` sources the decoder kills its process with SIGSEGV after
    ten real frames (as a crash in native decoder code does) and notes each try in OUT/crash-tries."""
    import signal

    import curation.chain
    from curation.decode import stream_frames
    from dataformat import native_source

    def crashing_decoder(path, threads=0, container=None):
        for index, frame in enumerate(stream_frames(path, threads, container)):
            if index == 10 and Path(path).name.startswith("crash"):
                with open(Path(output_path) / "crash-tries", "a") as tries:
                    tries.write(f"{label.split(':')[0]}\t{os.getpid()}\n")  # "batch 1", "batch 1.1"
                os.kill(os.getpid(), signal.SIGSEGV)
            yield frame

    curation.chain.stream_frames = crashing_decoder  # this worker dies with its patched module
    return stage_sources(input_path, [native_source(rel) for rel in relative_paths], output_path, config)


def test_a_source_that_crashes_its_worker_on_every_try_becomes_an_error_row(prefect_api, ray_local, sample_dir,
                                                                           tmp_path, monkeypatch):
    """A worker process killed while curating a source (segfault, out-of-memory kill) used to fail the whole run
    after Ray's retries; now its batch is split, the source is an error row naming the crash and the other
    sources are curated."""
    from prefect_ray import RayTaskRunner

    import flows.curate

    videos = tmp_path / "in"
    videos.mkdir()
    for name in ("crash.mp4", "static_shot.mp4"):
        shutil.copyfile(sample_dir / "videos" / "static_shot.mp4", videos / name)
    assert flows.curate.WORKER_CRASH_RETRIES == 2  # three tries in all; two here keep the test short
    monkeypatch.setattr(flows.curate, "WORKER_CRASH_RETRIES", 1)
    monkeypatch.setattr(flows.curate, "curate_batch_task", _curate_batch_whose_decoder_crashes)
    out = tmp_path / "out"
    settings = {"scorers": {"text": {"enabled": False}}}
    config = CurationConfig.from_overrides(settings)
    layout = prepare_output(out, config)
    runner = RayTaskRunner(**flows.curate._runner_args(None))  # as curate-lvd runs its sources
    counts = flows.curate.curate_sources.with_options(task_runner=runner)(
        str(videos), str(out), config, pending=2, progress=False, sources_per_task=2, batches_in_flight=1)
    summary = finalize(layout, config)  # the rest of the run
    tries = [line.split("\t") for line in (out / "crash-tries").read_text().splitlines()]
    # The batch of both sources dies twice, then the crashing source alone dies twice, each on a new worker.
    assert [label for label, _ in tries] == ["batch 1", "batch 1", "batch 1.1", "batch 1.1"]
    assert len({pid for _, pid in tries}) == 4
    assert counts["sources"] == 2 and counts["sources_error"] == 1 and counts["batches"] == 2
    rows = {row["source"]: row for row in read_parquet_rows(out / "sources.parquet")}
    assert rows["static_shot.mp4"]["status"] == "ok"
    assert rows["crash.mp4"]["status"] == "error"
    assert rows["crash.mp4"]["error"].startswith("worker crashed 2 times curating this source"), rows["crash.mp4"]
    assert summary["sources"] == 2 and summary["sources_error"] == 1 and summary["clips"] == 1
    assert {row["source"] for row in read_parquet_rows(out / "manifest.parquet")} == {"static_shot.mp4"}
    assert not (layout.clips / source_id("crash.mp4")).exists()


def _claiming_size(source: Path, target: Path, width: int, height: int) -> Path:
    """Three real frames of `source` as a lossless FFV1 Matroska file whose header then claims width x height
    (the 2-byte PixelWidth/PixelHeight elements patched; FFV1 keeps no size of its own)."""
    import av

    from common.video import decode_frames_at

    frames = decode_frames_at(source, [0, 1, 2])
    with av.open(str(target), "w") as writer:
        stream = writer.add_stream("ffv1", rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            writer.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")))
        writer.mux(stream.encode(None))
    data = target.read_bytes()
    for element, old, new in ((b"\xb0\x82", frames[0].shape[1], width), (b"\xba\x82", frames[0].shape[0], height)):
        assert data.count(element + old.to_bytes(2, "big")) == 1
        data = data.replace(element + old.to_bytes(2, "big"), element + new.to_bytes(2, "big"))
    target.write_bytes(data)
    return target


def test_a_header_claiming_60000x60000_is_refused_by_the_pixel_limit(sample_dir, tmp_path):
    """FFmpeg refuses to allocate such frames and the stream reports 0x0 (once 'below the minimum side'); the
    refusal names the claimed size and decode.max_pixels, for Matroska and for a YUV4MPEG header alike."""
    from curation.decode import SourceError, probe

    videos = tmp_path / "in"
    videos.mkdir()
    _claiming_size(sample_dir / "videos" / "static_shot.mp4", videos / "huge.mkv", 60000, 60000)
    _claiming_size(sample_dir / "videos" / "static_shot.mp4", videos / "fine.mkv", 640, 360)
    (videos / "huge.y4m").write_bytes(b"YUV4MPEG2 W60000 H60000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096))
    refusal = ("resolution 60000x60000 (3600.0 megapixels) exceeds decode.max_pixels=33177600 "
               "(33.2 megapixels; default 8K UHD)")
    out = tmp_path / "out"
    config = CurationConfig()
    prepare_output(out, config)
    assert curate_source(videos, "huge.mkv", out, config)["error"] == refusal
    with pytest.raises(SourceError) as error:
        probe(videos / "huge.y4m")
    assert str(error.value) == refusal
    assert probe(videos / "fine.mkv").width == 640  # the same file with its true size is read as usual


def _rotated_copy(source: Path, target: Path, count: int, gop: int) -> list:
    """The first `count` frames of `source` stored as a phone stores portrait video: the pictures as they are,
    plus a display matrix of -90 degrees (shown turned a quarter turn clockwise, as ffmpeg and players do);
    keyframes every `gop` frames. Returns the stored frames (RGB)."""
    import av

    from common.video import decode_frames_at

    frames = decode_frames_at(source, range(count))
    with av.open(str(target), "w") as writer:
        stream = writer.add_stream("libx264", rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        stream.set_display_rotation(-90)
        for frame in frames:
            writer.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")))
        writer.mux(stream.encode(None))
    return frames


def test_a_rotated_source_is_curated_as_it_is_displayed(sample_dir, tmp_path):
    """Rotation metadata used to be ignored: sideways size in the manifest, sideways frames for the scorers, and
    re-encoded clips without it (sideways in training). Now rows carry the displayed size, the scorers' frames
    and the frames training decodes are upright, and copied and re-encoded clips both keep the rotation
    (exact copies: tests/test_exact_clips.py)."""
    import av
    import cv2
    import numpy as np

    from common.video import decode_frames_at
    from curation.scorers.config import RaftConfig
    from curation.scorers.raft_motion import sample_raft_frames

    videos = tmp_path / "in"
    videos.mkdir()
    # bikes.mp4's cuts at 30 and 76 with keyframes every 40 frames: two shots re-encoded, the last one copied
    stored = _rotated_copy(sample_dir / "videos" / "bikes.mp4", videos / "portrait.mp4", count=137, gop=40)
    height, width = stored[0].shape[:2]
    shown = [np.rot90(frame, -1) for frame in stored]  # a quarter turn clockwise
    sideways = [np.rot90(frame, 1) for frame in stored]  # the wrong way round, for contrast
    out = tmp_path / "out"
    config = CurationConfig.from_overrides({"scorers": {"text": {"enabled": False}}, "clips": {"method": "keyframe"}})
    prepare_output(out, config)
    row = curate_source(videos, "portrait.mp4", out, config)
    assert (row["status"], row["width"], row["height"]) == ("ok", height, width)
    clips = read_parquet_rows(out / "work" / "clip_rows")
    assert {clip["clip_method"] for clip in clips} == {"keyframe", "reencode"}

    def distance(image, references) -> float:
        size = image.shape[1::-1]
        return min(float(np.abs(cv2.resize(np.ascontiguousarray(reference), size, interpolation=cv2.INTER_AREA)
                                .astype(int) - image).mean()) for reference in references)

    for clip in clips:
        assert (clip["width"], clip["height"]) == (height, width)
        span = range(clip["start_frame"], clip["end_frame"])
        strip = cv2.cvtColor(cv2.imread(clip["frames_path"]), cv2.COLOR_BGR2RGB)  # what the scorers see
        first = strip[: strip.shape[0] // 3]
        assert first.shape[0] > first.shape[1]
        assert distance(first, [shown[i] for i in span]) < 4 < 20 < distance(first, [sideways[i] for i in span])
        with av.open(clip["clip_path"]) as container:
            assert next(container.decode(video=0)).rotation == -90, clip["clip_method"]
        decoded = decode_frames_at(clip["clip_path"], [0])[0]  # as training reads clips
        assert decoded.shape == (width, height, 3)
        assert distance(decoded, [shown[clip["start_frame"]]]) < 4 < 20 < distance(decoded, [sideways[span[0]]])
    raft = RaftConfig(width=128, height=256, max_pairs=1)  # RAFT's frames: upright, scaled to width x height
    first = clips[0]
    pair = sample_raft_frames(first["clip_path"], "first", 25.0, first["end_frame"] - first["start_frame"], raft).frames
    assert pair.shape == (2, 256, 128, 3)
    start = first["start_frame"]
    assert distance(pair[0], [shown[start]]) < 6 < 20 < distance(pair[0], [sideways[start]])
