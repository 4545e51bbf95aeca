"""Curation throughput and cut accuracy, measured side by side in one run on the sample set.

  raw decode      PyAV decode of every frame (threaded, no RGB conversion): the ceiling
  chain           our single-decode chain: decode + analysis copy + cut cascade + 2-fps motion + frame spool
  peer            video2dataset's CutDetectionSubsampler (ContentDetector at native, 8 and 2 fps: the same
                  three rates) + OpticalFlowSubsampler (cv2 Farneback) on 2-fps frames at short side 16

video2dataset is fetched with `pip download --no-deps` into this benchmark's cache and its two subsampler
modules are loaded from their files (its package imports torch-1.x-era code). Targets: chain >= 60% of raw
decode throughput and >= 1.5x the peer. Usage: python benchmarks/curation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

if not __package__:  # run as a script: this file must not shadow the `curation` package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import av  # noqa: E402

from curation.chain import analysis_size, process_source  # noqa: E402
from curation.config import CurationConfig  # noqa: E402
from curation.cuts import CutCascade  # noqa: E402
from curation.decode import analysis_copy, stream_frames  # noqa: E402
from curation.motion import MotionMeter  # noqa: E402
from curation.sample_data import build_sample_data  # noqa: E402

CACHE = Path.home() / ".cache" / "lvd" / "bench"


def load_video2dataset_subsamplers():
    wheel_dir = CACHE / "video2dataset"
    wheels = sorted(wheel_dir.glob("video2dataset-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
                        "video2dataset"], check=True)
        wheels = sorted(wheel_dir.glob("video2dataset-*.whl"))
    extracted = wheel_dir / wheels[-1].stem
    if not extracted.exists():
        with zipfile.ZipFile(wheels[-1]) as archive:
            archive.extractall(extracted)
    package = types.ModuleType("v2d_subsamplers")
    package.__path__ = [str(extracted / "video2dataset" / "subsamplers")]
    sys.modules["v2d_subsamplers"] = package
    cut = importlib.import_module("v2d_subsamplers.cut_detection_subsampler")
    flow = importlib.import_module("v2d_subsamplers.optical_flow_subsampler")
    return cut.CutDetectionSubsampler, flow.OpticalFlowSubsampler, flow.resize_image_with_aspect_ratio, wheels[-1].name


def raw_decode(path: Path) -> int:
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return count


def chain_steps(path: Path, config: CurationConfig, steps: set[str]) -> int:
    """The chain's per-frame work with some steps switched off (for the per-step breakdown)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps, width, height = float(stream.average_rate), stream.codec_context.width, stream.codec_context.height
    aw, ah = analysis_size(width, height, config.decode.analysis_width)
    cascade, motion = CutCascade(config.cuts, fps), MotionMeter(config.motion, fps)
    count = 0
    for index, frame in enumerate(stream_frames(path)):
        count += 1
        if "analysis" not in steps:
            continue
        analysis = analysis_copy(frame, aw, ah)
        if "cuts" in steps:
            cascade.push(index, analysis)
        if "motion" in steps and motion.wants(index):
            motion.push(index, analysis)
    if "cuts" in steps:
        cascade.finish()
    return count


def peer(path: Path, cut_cls, flow_cls, resize) -> tuple[int, list[int]]:
    detector = cut_cls(cut_detection_mode="all", framerates=[8, 2])
    _, cuts, error = detector({"video": [path.read_bytes()]})
    if error:
        raise RuntimeError(error)
    # video2dataset feeds the flow subsampler frames already decoded at the target fps and size.
    frames, count = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        step = float(stream.average_rate) / 2.0
        next_sample = 0.0
        for index, frame in enumerate(container.decode(stream)):
            count += 1
            if index + 1e-6 >= next_sample:
                next_sample += step
                frames.append(resize(frame.to_ndarray(format="bgr24"), 16)[0])
    flow_cls(detector="cv2")(frames)
    starts = [scene[0] for scene in cuts["cuts_original_fps"]][1:]
    return count, starts


def accuracy(found: dict[str, list[int]], truth: dict, tolerance: int = 2) -> dict[str, float]:
    hits = expected = predicted = 0
    for name, cuts in found.items():
        real = truth[name]["cuts"]
        expected += len(real)
        predicted += len(cuts)
        hits += sum(any(abs(c - r) <= tolerance for c in cuts) for r in real)
    precision = hits / predicted if predicted else 1.0
    return {"recall": hits / expected if expected else 1.0, "precision": precision, "hits": hits, "cuts": expected}


def best_of(repeats: int, function, *args):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-dir", default=str(CACHE / "sample"))
    args = parser.parse_args()
    root = build_sample_data(args.sample_dir)
    truth = json.loads((root / "ground_truth.json").read_text())
    files = [root / "videos" / name for name, t in sorted(truth.items()) if not t["error"]]
    config = CurationConfig()
    cut_cls, flow_cls, resize, wheel = load_video2dataset_subsamplers()

    totals = {key: 0.0 for key in ("raw", "decode_only", "analysis", "cuts", "chain", "peer", "process_source")}
    frames, ours, theirs = 0, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for path in files:
            t, n = best_of(args.repeats, raw_decode, path)
            totals["raw"] += t
            frames += n
            totals["decode_only"] += best_of(args.repeats, chain_steps, path, config, set())[0]
            totals["analysis"] += best_of(args.repeats, chain_steps, path, config, {"analysis"})[0]
            totals["cuts"] += best_of(args.repeats, chain_steps, path, config, {"analysis", "cuts"})[0]
            totals["chain"] += best_of(args.repeats, chain_steps, path, config, {"analysis", "cuts", "motion"})[0]
            t, result = best_of(args.repeats, process_source, path, path.name, Path(scratch) / path.stem, config)
            totals["process_source"] += result.timings["decode_and_analyse"]
            ours[path.name] = result.source_row["cuts"]
            t, (_, starts) = best_of(args.repeats, peer, path, cut_cls, flow_cls, resize)
            totals["peer"] += t
            theirs[path.name] = starts

    fps = {key: frames / value for key, value in totals.items()}
    print(f"sample set: {len(files)} videos, {frames} frames; best of {args.repeats}; peer: {wheel}")
    print(f"{'stage':<44}{'frames/s':>10}")
    print(f"{'raw PyAV decode (no RGB)':<44}{fps['raw']:>10.0f}")
    print(f"{'  chain: decode via stream_frames':<44}{fps['decode_only']:>10.0f}")
    print(f"{'  chain: + analysis copy (128 px BGR)':<44}{fps['analysis']:>10.0f}")
    print(f"{'  chain: + cut cascade (3 rates + fades)':<44}{fps['cuts']:>10.0f}")
    print(f"{'  chain: + 2-fps Farneback motion':<44}{fps['chain']:>10.0f}")
    print(f"{'process_source (chain + frame spool)':<44}{fps['process_source']:>10.0f}")
    print(f"{'peer: video2dataset cut (3 rates) + flow':<44}{fps['peer']:>10.0f}")
    print(f"ratio chain (decode+cuts+motion) / raw decode: {fps['chain'] / fps['raw']:.2f}  (target >= 0.60)")
    print(f"ratio process_source (+ scorer frame spool) / raw decode: {fps['process_source'] / fps['raw']:.2f}")
    print(f"ratio chain / peer:          {fps['chain'] / fps['peer']:.2f}x (target >= 1.5x)")
    print(f"ratio process_source / peer: {fps['process_source'] / fps['peer']:.2f}x")
    ours_acc, theirs_acc = accuracy(ours, truth), accuracy(theirs, truth)
    print(f"cut accuracy (±2 frames) ours: recall {ours_acc['recall']:.2f} precision {ours_acc['precision']:.2f} "
          f"({ours_acc['hits']}/{ours_acc['cuts']})")
    print(f"cut accuracy (±2 frames) peer: recall {theirs_acc['recall']:.2f} precision {theirs_acc['precision']:.2f} "
          f"({theirs_acc['hits']}/{theirs_acc['cuts']})")


if __name__ == "__main__":
    main()
