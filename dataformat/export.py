"""Shards out as plain files: the kept clips of a shard folder as one MP4 per sample, for tools that read
video folders (the FVD reference set of a smoke-test pipeline run, a quick look with any player)."""

from __future__ import annotations

from pathlib import Path

from dataformat.atomic import atomic_write
from dataformat.shards import read_shard_samples


def export_clips(shards_dir: str | Path, target: str | Path) -> list[Path]:
    """Mirror the clips of every `*.tar` under `shards_dir` into `target/KEY.mp4` (sorted by name).

    Rerunning rewrites only files whose size changed and removes MP4s whose sample is gone, so `target`
    always holds exactly the shards' clips. Samples without a video are skipped."""
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for shard in sorted(Path(shards_dir).glob("*.tar")):
        for sample in read_shard_samples(shard):
            if sample["mp4"] is None:
                continue
            path = out / f"{sample['key']}.mp4"
            if not path.exists() or path.stat().st_size != len(sample["mp4"]):
                atomic_write(path, sample["mp4"])
            written.append(path)
    keep = set(written)
    for stale in out.glob("*.mp4"):
        if stale not in keep:
            stale.unlink()
    return sorted(written)
