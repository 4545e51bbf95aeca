"""A curation run on disk: which sources are done, per-source commits, and the final LVD-F files.

The paths are `dataformat.RunLayout`'s (README "Output formats"): each source commits its clip rows
(`work/clip_rows/`) and then its source row (`sources.parquet/`); `finalize` writes manifest.parquet,
shards/*.tar and summary.json after every source is done.

A source is committed by renaming its source row into place last, so a run killed at any point is
rerun to exactly one row per source: unfinished sources are simply processed again from scratch In the
flow, Ray workers stage a source (everything but the source row) and the driver commits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.requests import RequestError
from curation.chain import SourceResult, error_result, process_source, storage_fault
from curation.config import CLIP_METHODS, CurationConfig
from curation.decode import StorageFault, is_storage_fault
from curation.dedup import find_duplicates, read_duplicate_groups
from curation.filtering import apply_filters
from curation.listing import is_remote, iter_sources, pending_sources
from curation.phash import clip_signature
from curation.types import ClipFrames
from dataformat import (
    CLIP_PART_SCHEMA,
    MANIFEST_SCHEMA,
    SOURCE_ID_LENGTH,
    SOURCES_SCHEMA,
    Column,
    RunLayout,
    atomic_write,
    atomic_write_json,
    read_parquet_rows,
    remove_stale_temporaries,
    source_id,
    video_frames_path,
    write_parquet_atomic,
    write_shards,
)
from infra.local import current_ray_node_id
from infra.output_lock import acquire_output_lock


def discover_sources(input_root: str | Path, extensions: tuple[str, ...]) -> Iterator[str]:
    """Relative paths of the video files under `input_root` (a folder, a file or an fsspec URL), streamed in
    sorted order (curation/listing.py); a missing input raises FileNotFoundError on the first `next`."""
    return iter_sources(input_root, extensions)


def input_file(input_root: str | Path, relative_path: str) -> Path:
    root = Path(input_root)
    return root if root.is_file() else root / relative_path


@contextlib.contextmanager
def local_copy(input_root: str | Path, relative_path: str, scratch: Path) -> Iterator[Path]:
    """A local path for the source: itself, or a temporary download of a remote object.

    Decoding needs random access (MP4 index at the end), so remote sources are copied to the worker's
    disk first and deleted afterwards.
    """
    if not is_remote(input_root):
        yield input_file(input_root, relative_path)
        return
    import fsspec

    url = str(input_root).rstrip("/")
    filesystem, root_path = fsspec.core.url_to_fs(url)
    remote = root_path if filesystem.isfile(root_path) else f"{root_path}/{relative_path}"
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f"download-{source_id(relative_path)}{Path(relative_path).suffix}"
    try:
        filesystem.get(remote, str(target))
        yield target
    finally:
        target.unlink(missing_ok=True)


# Settings `finalize` applies afresh on every run (from the committed sources), so a rerun may change them.
RECOMPUTED_SETTINGS = ("filters", "shards", "dedup")
# Settings that change how fast work runs, never what it produces.
THROUGHPUT_SETTINGS = ("pool", "threads", "use_ray", "frames_per_forward", "clips_per_forward",
                       "pairs_per_forward", "lookahead_mb")


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_settings(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs and shapes what committed sources hold (settings one
    of the two does not know, e.g. added by a newer version, are not compared)."""
    old, new = _flatten(recorded), _flatten(json.loads(json.dumps(requested, default=str)))
    changes = []
    for key in sorted(old.keys() & new.keys()):
        parts = key.split(".")
        if parts[0] in RECOMPUTED_SETTINGS or any(part in THROUGHPUT_SETTINGS for part in parts):
            continue
        if old[key] != new[key]:
            changes.append(f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}")
    return changes


class OutputPathError(RequestError):
    """The output path cannot hold a run; the message is one line naming it (the CLI exits with code 2)."""


VIRTUAL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def check_output_dir(out: str | Path) -> Path:
    """Create `out` if needed and make sure a run can write there; OutputPathError (one line) if not."""
    path = Path(out).expanduser()
    resolved = path.resolve()
    for root in VIRTUAL_FILE_SYSTEMS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise OutputPathError(f"output path {out} is under {root}, a virtual file system; use a directory on disk")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output path {out} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lvd-write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputPathError(f"output path {out} cannot be written: {error.strerror or error}") from None
    return path


def prepare_output(out: str | Path, config: CurationConfig) -> RunLayout:
    """Take OUT for this process (one writer per OUT: another live run's lock is an error naming it), then
    clear what killed writers left and record the settings."""
    layout = RunLayout(check_output_dir(out))
    acquire_output_lock(layout.out)
    if any(len(part.stem.removeprefix("part-")) != SOURCE_ID_LENGTH for part in layout.sources.glob("part-*.parquet")):
        raise ValueError(f"{layout.out} was written by an older lvd-pipeline (48-bit source ids, which can "
                         "collide); curate into a new output directory")
    if layout.config.is_file() and any(layout.sources.glob("part-*.parquet")):
        changes = changed_settings(json.loads(layout.config.read_text()), config.to_dict())
        if changes:
            raise ValueError(f"{layout.out} holds sources curated with other settings ({'; '.join(changes)}); "
                             "rerun with those settings, curate into a new output directory, or delete "
                             f"{layout.out} to start over")
    remove_stale_temporaries(layout.out)
    atomic_write_json(layout.config, config.to_dict())
    return layout


def completed_sources(layout: RunLayout) -> set[str]:
    """The `source` column of the committed sources (labels: see `source_label`)."""
    return {row["source"] for row in read_parquet_rows(layout.sources)}


def completed_source_ids(layout: RunLayout) -> set[str]:
    """Ids of the committed sources (their source row is in place)."""
    return layout.committed_source_ids()


def uncommitted(layout: RunLayout, sources: Iterable[str]) -> Iterator[str]:
    """The relative paths in `sources` that OUT has not committed (matched by id: any file name works),
    streamed."""
    return pending_sources(layout, sources)


def save_clip_frames(path: Path, frames: np.ndarray) -> None:
    """Frames (first, middle, last; or the video captioner's) stacked vertically in one JPEG (also a
    ready-made contact strip)."""
    stacked = np.concatenate(list(frames), axis=0)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(stacked, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise OSError(f"cannot encode the sampled frames of {path.name} as JPEG")
    atomic_write(path, encoded.tobytes())


def load_clip_frames(row: dict[str, Any]) -> ClipFrames:
    """The first/middle/last frames of a clip, and its video-captioner frames when they were kept."""
    stacked = cv2.cvtColor(cv2.imread(row[Column.FRAMES_PATH], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    height = stacked.shape[0] // 3
    frames = stacked[: 3 * height].reshape(3, height, stacked.shape[1], 3)
    video_frames = None
    video_path = video_frames_path(row[Column.FRAMES_PATH])
    if video_path.exists():
        strip = cv2.cvtColor(cv2.imread(str(video_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        count = strip.shape[0] // height
        video_frames = strip[: count * height].reshape(count, height, strip.shape[1], 3)
    return ClipFrames(clip_id=row[Column.CLIP_ID], frames=frames, caption=row.get(Column.CAPTION),
                      video_frames=video_frames)


def curate_source(input_root: str | Path, relative_path: str, out: str | Path, config: CurationConfig) -> dict:
    """Process one source and commit it in this process; returns its source row plus clip count and timings."""
    return commit_source(out, relative_path, stage_source(input_root, relative_path, out, config))


def stage_source(input_root: str | Path, relative_path: str, out: str | Path, config: CurationConfig) -> dict:
    """Process one source and write all of it but the commit: clips, frames and clip rows, which count for
    nothing until `commit_source` writes the source row (the flow's Ray workers stage, its driver commits, so
    a killed driver leaves no worker able to commit). Returns the source row plus clip count and timings."""
    layout = RunLayout(out)
    sid = source_id(relative_path)
    clips_dir, frames_dir = layout.clips / sid, layout.frames / sid
    for directory in (clips_dir, frames_dir):  # a previous attempt may have died half-way
        shutil.rmtree(directory, ignore_errors=True)
    try:
        with local_copy(input_root, relative_path, layout.downloads) as path:
            result = process_source(path, relative_path, clips_dir, config)
    except StorageFault:
        raise
    except OSError as error:  # the download failed: an error row unless the machine is at fault
        if is_storage_fault(error):
            raise storage_fault(relative_path, error) from error
        result = error_result(relative_path, f"unreadable path: {error}")
    try:
        return _stage(layout, sid, result)
    except Exception as error:
        if is_storage_fault(error):
            raise storage_fault(relative_path, error) from error
        raise


def stage_sources(input_root: str | Path, relative_paths: list[str], out: str | Path,
                  config: CurationConfig) -> list[dict]:
    """Stage a batch of sources one after the other (one Prefect task run curates a batch, so a run of millions
    of sources is thousands of task runs); `stage_source`'s result for each, in order."""
    return [stage_source(input_root, relative_path, out, config) for relative_path in relative_paths]


def commit_source(out: str | Path, relative_path: str, staged: dict) -> dict:
    """Commit a staged source (`stage_source`'s result) by writing its source row; returns `staged`."""
    row = {name: staged.get(name) for name in SOURCES_SCHEMA.names}
    try:
        write_parquet_atomic([row], SOURCES_SCHEMA, RunLayout(out).source_part(relative_path))
    except Exception as error:
        if is_storage_fault(error):
            raise storage_fault(relative_path, error) from error
        raise
    return staged


def commit_crashed_source(out: str | Path, relative_path: str, attempts: int, error: BaseException) -> dict:
    """Commit an error row for a source whose every try killed the process curating it (a crash in native
    code such as the decoder, or an out-of-memory kill): the run records it and goes on. Called by the
    driver once the retries are used up; what the dead tries left behind is removed."""
    layout = RunLayout(out)
    sid = source_id(relative_path)
    clips_dir, frames_dir = layout.clips / sid, layout.frames / sid
    for directory in (clips_dir, frames_dir):
        shutil.rmtree(directory, ignore_errors=True)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    message = (f"worker crashed {attempts} times curating this source (the process died: a crash in native code "
               f"such as the decoder, or killed for memory): {reason}")
    return commit_source(out, relative_path, _stage(layout, sid, error_result(relative_path, message)))


def _stage(layout: RunLayout, sid: str, result: SourceResult) -> dict:
    """Write a source's clip frames and clip rows (not yet its source row, the commit)."""
    for row, clip_frames in zip(result.clip_rows, result.clip_frames, strict=True):
        row["frames_path"] = str(layout.clip_frames(sid, row["clip_id"]))
        save_clip_frames(Path(row["frames_path"]), clip_frames.frames)
        row[Column.FRAME_HASH] = clip_signature(clip_frames.frames)  # near-duplicate removal's signature without CLIP
        if clip_frames.video_frames is not None:
            save_clip_frames(video_frames_path(row["frames_path"]), clip_frames.video_frames)
    write_parquet_atomic(result.clip_rows, CLIP_PART_SCHEMA, layout.clip_rows_part(sid))
    result.source_row[Column.NODE_ID] = current_ray_node_id()  # which machine of a cluster did it (debugging)
    return {**result.source_row, "source_id": sid, "num_clips": len(result.clip_rows), "timings": result.timings}


def pending_clip_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """Clip rows of every committed source (rows of uncommitted sources are ignored)."""
    done = completed_source_ids(layout)
    rows = []
    for part in sorted(layout.clip_rows.glob("part-*.parquet")):
        if part.stem.removeprefix("part-") in done:
            rows.extend(read_parquet_rows(part))
    return sorted(rows, key=lambda row: row["clip_id"])


def finalize(layout: RunLayout, config: CurationConfig, annotations: dict[str, dict] | None = None) -> dict:
    """Group near-duplicates (unless already done for these inputs), filter all clips of the run, write shards of
    the kept ones and the manifest; return the summary."""
    duplicates = find_duplicates(layout.out, config)
    rows = pending_clip_rows(layout)
    for row in rows:
        row.update((annotations or {}).get(row["clip_id"], {}))
        row["shard"], row["key"] = None, None
    summary = apply_filters(rows, config.filters, read_duplicate_groups(layout.out), config.dedup,
                            config.dedup_method())
    write_shards([r for r in rows if r["keep"]], layout.shards, config.shards.max_samples, config.shards.max_bytes)
    write_parquet_atomic(rows, MANIFEST_SCHEMA, layout.manifest)
    sources = read_parquet_rows(layout.sources)
    report = {
        "sources": len(sources),
        "sources_ok": sum(s["status"] == "ok" for s in sources),
        "sources_error": sum(s["status"] == "error" for s in sources),
        "errors": {s["source"]: s["error"] for s in sources if s["status"] == "error"},
        "clips": summary.total,
        "kept": summary.kept,
        "shards": sorted(p.name for p in layout.shards.glob("*.tar")),
        "rules": [
            {**asdict(o.rule), "scored": o.scored, "dropped": o.dropped, "threshold": o.threshold, "skipped": o.skipped}
            for o in summary.outcomes
        ],
        "clip_methods": {m: sum(r.get("clip_method") == m for r in rows) for m in CLIP_METHODS},
        "duplicates": {key: value for key, value in duplicates.items() if key != "fingerprint"},
    }
    atomic_write_json(layout.summary, report)
    return report


def run_sequential(input_root: str | Path, out: str | Path, config: CurationConfig | None = None) -> dict:
    """The whole run in this process, without Prefect or Ray (benchmarks, debugging, resume tests)."""
    config = config or CurationConfig()
    layout = prepare_output(out, config)
    for relative_path in uncommitted(layout, discover_sources(input_root, config.video_extensions)):
        curate_source(input_root, relative_path, out, config)
    return finalize(layout, config)
