"""What a training run shows while it runs: TensorBoard scalars and sample videos, a progress file the
Prefect task polls, a metrics log for the final report, and the loss plot.

Only rank 0 writes. Sample videos go to TensorBoard as animated GIF image summaries (what
`SummaryWriter.add_video` produces, without needing moviepy) and to `samples/step-NNNNNN.gif`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataformat import StageLayout, atomic_write_json


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SAMPLE_FPS = 8.0  # training sample videos are a few frames: slow enough to see the motion

class TrainingMonitor:
    """Rank 0's TensorBoard writer, metrics log (metrics.jsonl) and progress file (progress.json)."""

    def __init__(self, log_dir: Path, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.log_dir, self.total_steps = log_dir, total_steps
        self.layout = StageLayout(log_dir)
        self.metrics_path, self.progress_path = self.layout.metrics, self.layout.progress
        self._last_time, self._last_step = time.monotonic(), start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run forgets the steps logged after its checkpoint, so the log has each step once.
        kept = [m for m in read_metrics(self.metrics_path) if m["step"] <= start_step]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.writer = SummaryWriter(str(self.layout.tensorboard), purge_step=start_step + 1)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        steps = metrics["step"] - self._last_step
        metrics = {**metrics, "samples_per_s": metrics["samples"] * steps / max(now - self._last_time, 1e-9)}
        self._last_time, self._last_step = now, metrics["step"]
        for name in ("loss", "lr", "grad_norm", "samples_per_s"):
            self.writer.add_scalar(f"train/{name}", metrics[name], metrics["step"])
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        progress = {"step": metrics["step"], "total": self.total_steps, "loss": metrics["loss"],
                    "phase": metrics["phase"]}
        atomic_write_json(self.progress_path, progress, indent=None)

    def log_video(self, frames: np.ndarray, step: int) -> Path | None:
        """Write uint8 (T, H, W, 3) frames as a GIF file (SAMPLE_FPS) and as TensorBoard's `samples/video`."""
        if not self.enabled:
            return None
        from tensorboard.compat.proto.summary_pb2 import Summary

        from common.video import save_video

        path = save_video(frames, self.layout.sample(step), SAMPLE_FPS)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                              encoded_image_string=path.read_bytes())
        summary = Summary(value=[Summary.Value(tag="samples/video", image=image)])
        self.writer._get_file_writer().add_summary(summary, step)
        self.writer.flush()
        return path

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> Path:
    """Loss per step (and its running mean) as a PNG for the Prefect report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        window = max(2, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("EDM loss")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_motion_buckets(counts: list[int], mapping: str, path: Path) -> Path:
    """Histogram of the motion_bucket_ids the stage trained on (one count per bucket 0..255) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(counts) or [0] * 256
    figure, axis = plt.subplots(figsize=(6, 2.5), dpi=100)
    axis.bar(range(len(counts)), counts, width=1.0)
    axis.set_xlim(-1, len(counts))
    axis.set_xlabel("motion_bucket_id")
    axis.set_ylabel("training samples")
    axis.set_title(f"motion buckets trained on ({mapping} mapping, {sum(counts)} samples)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
