"""Curation throughput and cut accuracy, measured side by side in one run on a short-clip set.

The set (`build_short_clip_set`, from the sample footage): 38 videos of 2-8 s at 640x360, each two or three
real shots joined by hard cuts or 10-15-frame dissolves, x264-encoded like uploads are (half with 10-s
GOPs and keyframes at scene cuts, half with 2-s GOPs and none), so clip writing has to re-encode shots
that keyframe snapping would lose.

  raw decode       PyAV decode of every frame (threaded, no RGB conversion): the ceiling
  chain            our single-decode chain: decode + analysis copy + cut cascade + 2-fps motion
  decode+analysis  decode_and_analyse without clip writing: the chain + the scorers' frame spool
  whole            process_source wall time: decode + analysis + writing every clip file (re-encoded clips
                   are encoded from the chain's own frames while it decodes)
  peer (defaults)  video2dataset's CutDetectionSubsampler at its defaults (ContentDetector at the native
                   rate) + OpticalFlowSubsampler (cv2 Farneback) on 2-fps frames at short side 16
  peer (3 rates)   the same with ContentDetector also at 8 and 2 fps (our cascade's three rates)

video2dataset is fetched with `pip download --no-deps` into this benchmark's cache and its two subsampler
modules are loaded from their files (its package imports torch-1.x-era code). Targets: whole >= 0.6x raw
decode; decode+analysis >= 0.70x raw decode and >= 2x the defaults peer.
Usage: python benchmarks/curation.py [--repeats 3]
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
import numpy as np  # noqa: E402

from common.cache import benchmark_cache  # noqa: E402
from common.video import write_video  # noqa: E402
from curation.chain import chain_steps, decode_and_analyse, process_source  # noqa: E402
from curation.config import CLIP_METHODS, CurationConfig  # noqa: E402
from curation.sample_data import _cover, _decode_all, _dissolve, footage_paths  # noqa: E402

CACHE = benchmark_cache()


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


def build_short_clip_set(root: Path, count: int = 38, seed: int = 0) -> tuple[list[Path], dict]:
    """`count` 2-8 s videos of real shots joined by hard cuts and dissolves; returns paths and ground truth."""
    truth_file = root / "short_clips.json"
    if truth_file.exists():
        truth = json.loads(truth_file.read_text())
        return [root / name for name in sorted(truth)], truth
    paths = footage_paths()
    bikes = [_cover(f) for f in _decode_all(paths["bikes"])]
    bunny = [_cover(f) for f in _decode_all(paths["bigbuckbunny"])]
    phone = [_cover(f) for f in _decode_all(paths["carphone"])]
    # real shots: bikes.mp4's own shots, and two separate pieces of each single-shot clip
    shots = [bikes[a:b] for a, b in ((0, 30), (30, 76), (76, 137), (137, 187), (187, 242))]
    shots += [bunny[:60], bunny[72:], phone[:55], phone[65:]]
    rng = np.random.default_rng(seed)
    truth = {}
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        picks = rng.choice(len(shots), size=int(rng.integers(2, 4)), replace=False)
        frames: list[np.ndarray] = []
        cuts, kinds = [], []
        for pick in picks:
            shot = shots[pick][: int(rng.integers(28, 90))]
            if not frames:
                frames = list(shot)
            elif rng.random() < 0.5:
                cuts.append(len(frames))
                kinds.append("hard")
                frames += list(shot)
            else:
                length = int(rng.integers(10, 16))
                cuts.append(len(frames) - length + length // 2)
                kinds.append("dissolve")
                frames = _dissolve(frames, list(shot), length)
        frames = frames[: 8 * 25]
        cuts = [c for c in cuts if c < len(frames) - 5]
        name = f"short_{index:02d}.mp4"
        uploaded = index % 2 == 0  # x264 defaults: 10-s GOPs, keyframes at scene cuts
        write_video(root / name, frames, 25, crf=20, gop=250 if uploaded else 50, scene_cut_keyframes=uploaded)
        truth[name] = {"cuts": cuts, "kinds": kinds[: len(cuts)], "num_frames": len(frames), "error": False}
    truth_file.write_text(json.dumps(truth, indent=1))
    return [root / name for name in sorted(truth)], truth


def raw_decode(path: Path) -> int:
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return count


def peer(path: Path, cut_cls, flow_cls, resize, framerates: list[int] | None) -> tuple[int, list[int]]:
    """video2dataset's cut detection (at the native rate, plus `framerates`) and 2-fps Farneback flow."""
    detector = cut_cls(cut_detection_mode="all", framerates=framerates)
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


def analyse_only(path: Path, scratch: Path, config: CurationConfig) -> int:
    """Decode + analysis + scorer spool, no clip files (what the chain costs before it writes clips)."""
    analysis = decode_and_analyse(path, config, scratch, live_clips=False)
    analysis.spool.close()
    return analysis.num_frames


def whole_source(path: Path, scratch: Path, config: CurationConfig):
    """process_source into a fresh directory (clip files included); returns its result."""
    out = scratch / f"{path.stem}-{time.perf_counter_ns()}"
    result = process_source(path, path.name, out, config)
    if result.source_row["status"] != "ok":
        raise RuntimeError(f"{path.name}: {result.source_row['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set-dir", default=str(CACHE / "short_clips"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N videos (quick A/B runs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a curation setting, e.g. clips.reencode_preset=ultrafast")
    args = parser.parse_args()
    files, truth = build_short_clip_set(Path(args.set_dir))
    files = files[: args.limit]
    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = json.loads(value) if value[:1].isdigit() else value
    config = CurationConfig.from_overrides(overrides)
    cut_cls, flow_cls, resize, wheel = load_video2dataset_subsamplers()

    keys = ("raw", "chain", "decode_analysis", "whole", "peer_defaults", "peer_rates")
    totals = dict.fromkeys(keys, 0.0)
    frames, ours, theirs, methods, second_pass = 0, {}, {}, dict.fromkeys(CLIP_METHODS, 0), 0
    roll = shown = 0
    with tempfile.TemporaryDirectory() as scratch:
        for path in files:  # the sides of one file run back to back, so a noisy neighbour hits all of them
            t, n = best_of(args.repeats, raw_decode, path)
            totals["raw"] += t
            frames += n
            totals["chain"] += best_of(args.repeats, chain_steps, path, config, {"analysis", "cuts", "motion"})[0]
            totals["decode_analysis"] += best_of(args.repeats, analyse_only, path, Path(scratch), config)[0]
            t, best = best_of(args.repeats, whole_source, path, Path(scratch), config)
            totals["whole"] += t
            ours[path.name] = best.source_row["cuts"]
            second_pass += best.second_pass_clips
            for row in best.clip_rows:
                methods[row["clip_method"]] += 1
                roll += row["pre_roll_frames"] + row["post_roll_frames"]
                shown += row["end_frame"] - row["start_frame"]
            totals["peer_defaults"] += best_of(args.repeats, peer, path, cut_cls, flow_cls, resize, None)[0]
            t, (_, starts) = best_of(args.repeats, peer, path, cut_cls, flow_cls, resize, [8, 2])
            totals["peer_rates"] += t
            theirs[path.name] = starts

    fps = {key: frames / value for key, value in totals.items() if value}
    print(f"short-clip set: {len(files)} videos, {frames} frames; best of {args.repeats}; peer: {wheel}")
    print(f"clip files (clips.method {config.clips.method}): {methods['exact-copy']} exact copies (pre-/post-roll "
          f"{roll} frames, {roll / max(shown, 1):.0%} of the {shown} shown), {methods['keyframe']} copied between "
          f"keyframes, {methods['reencode']} re-encoded (preset {config.clips.reencode_preset}, crf "
          f"{config.clips.reencode_crf}; {second_pass} of them by a second decode pass, the rest while decoding)")
    print(f"{'stage':<52}{'frames/s':>10}")
    print(f"{'raw PyAV decode (no RGB)':<52}{fps['raw']:>10.0f}")
    print(f"{'chain: decode + analysis copy + cuts + motion':<52}{fps['chain']:>10.0f}")
    print(f"{'decode + analysis (chain + scorer-frame spool)':<52}{fps['decode_analysis']:>10.0f}")
    print(f"{'whole per-source work (+ clip files)':<52}{fps['whole']:>10.0f}")
    print(f"{'peer: video2dataset cut (defaults) + flow':<52}{fps['peer_defaults']:>10.0f}")
    print(f"{'peer: video2dataset cut (3 rates) + flow':<52}{fps['peer_rates']:>10.0f}")
    clip_share = 1 - totals["decode_analysis"] / totals["whole"]
    print(f"clip files: {totals['whole'] - totals['decode_analysis']:.2f} s more than decode + analysis "
          f"({clip_share:.0%} of the {totals['whole']:.2f} s per-source work)")
    print(f"ratio whole / raw decode:                  {fps['whole'] / fps['raw']:.2f}  (target >= 0.60)")
    print(f"ratio decode+analysis / raw decode:        {fps['decode_analysis'] / fps['raw']:.2f}  (target >= 0.70)")
    print(f"ratio decode+analysis / peer (defaults):   {fps['decode_analysis'] / fps['peer_defaults']:.2f}x "
          "(target >= 2x)")
    print(f"ratio decode+analysis / peer (3 rates):    {fps['decode_analysis'] / fps['peer_rates']:.2f}x")
    ours_acc, theirs_acc = accuracy(ours, truth), accuracy(theirs, truth)
    print(f"cut accuracy (±2 frames) ours: recall {ours_acc['recall']:.2f} precision {ours_acc['precision']:.2f} "
          f"({ours_acc['hits']}/{ours_acc['cuts']})")
    print(f"cut accuracy (±2 frames) peer (3 rates): recall {theirs_acc['recall']:.2f} "
          f"precision {theirs_acc['precision']:.2f} ({theirs_acc['hits']}/{theirs_acc['cuts']})")


if __name__ == "__main__":
    main()
