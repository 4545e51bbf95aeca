"""Output files of a curation run: atomic Parquet parts, the manifest, and WebDataset shards.

Every file is written under a temporary name that readers ignore (leading '.') and renamed into place,
so a run killed at any moment leaves either the old file or the new one, never a torn one. Shards are
written into a staging directory that replaces `shards/` in one rename.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

MANIFEST_COLUMNS = (
    "clip_id", "source", "start_frame", "end_frame", "start_s", "end_s", "fps", "width", "height",
    "motion_score", "text_area", "aesthetic_score", "clip_score", "caption", "keep", "drop_reasons",
    "shard", "key", "captions", "scorer_errors", "raft_motion", "hq",
)
# The `captions` struct: one caption per captioner of the paper (docs/recipe.md §1); the trainer mixes them.
CAPTIONS_TYPE = pa.struct([("coca", pa.string()), ("video", pa.string()), ("llm_summary", pa.string())])
MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()), ("source", pa.string()), ("start_frame", pa.int64()), ("end_frame", pa.int64()),
        ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float64()), ("width", pa.int64()),
        ("height", pa.int64()), ("motion_score", pa.float64()), ("text_area", pa.float64()),
        ("aesthetic_score", pa.float64()), ("clip_score", pa.float64()), ("caption", pa.string()),
        ("keep", pa.bool_()), ("drop_reasons", pa.list_(pa.string())), ("shard", pa.string()), ("key", pa.string()),
        ("clip_method", pa.string()),
        ("captions", CAPTIONS_TYPE), ("scorer_errors", pa.list_(pa.string())),
        ("raft_motion", pa.float64()), ("hq", pa.bool_()),
    ]
)
# Per-source staging rows: the manifest row plus where the clip file and its sampled frames live.
CLIP_PART_SCHEMA = MANIFEST_SCHEMA.append(pa.field("clip_path", pa.string())).append(
    pa.field("frames_path", pa.string())
)
SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()), ("status", pa.string()), ("error", pa.string()), ("num_frames", pa.int64()),
        ("fps", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("duration_s", pa.float64()),
        ("cuts", pa.list_(pa.int64())),
    ]
)


def _fsync_rename(temporary: Path, final: Path) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def write_parquet_atomic(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Write rows (extra keys ignored, missing ones null) to `path` via a hidden temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, temporary)
    _fsync_rename(temporary, path)


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file or of a dataset directory (hidden and temporary files skipped)."""
    if not path.exists():
        return []
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        rows: list[dict[str, Any]] = []
        for file in files:
            rows.extend(pq.read_table(file).to_pylist())
        return rows
    return pq.read_table(path).to_pylist()


def sample_json(row: dict[str, Any]) -> bytes:
    """The `KEY.json` payload: the clip's manifest row (manifest columns only)."""
    return json.dumps({name: row.get(name) for name in MANIFEST_COLUMNS}, sort_keys=True).encode()


def write_shards(
    rows: Iterable[dict[str, Any]], shard_dir: Path, max_samples: int, max_bytes: int, prefix: str = "shard"
) -> list[dict[str, Any]]:
    """Write kept clips (`clip_path` must exist) as WebDataset shards into a staged directory that
    atomically replaces `shard_dir`. Sets `shard` and `key` on each row; returns the rows written."""
    shard_dir = Path(shard_dir)
    staging = shard_dir.parent / f".{shard_dir.name}-staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    written: list[dict[str, Any]] = []
    shard_index, shard_samples, shard_bytes, writer, stream = 0, 0, 0, None, None

    def open_shard() -> None:
        nonlocal writer, stream
        stream = open(staging / f"{prefix}-{shard_index:06d}.tar", "wb")  # noqa: SIM115 - closed in close_shard
        writer = wds.TarWriter(stream)

    def close_shard() -> None:
        nonlocal writer, stream
        if writer is not None:
            writer.close()
            stream.close()
            writer, stream = None, None

    try:
        for row in rows:
            video = Path(row["clip_path"]).read_bytes()
            shard_full = shard_samples >= max_samples or (shard_samples > 0 and shard_bytes + len(video) > max_bytes)
            if writer is None or shard_full:
                if writer is not None:
                    close_shard()
                    shard_index += 1
                open_shard()
                shard_samples, shard_bytes = 0, 0
            key = row["clip_id"].replace(".", "_")
            row["shard"] = f"{shard_dir.name}/{prefix}-{shard_index:06d}.tar"
            row["key"] = key
            sample = {"__key__": key, "mp4": video, "json": sample_json(row)}
            if row.get("caption"):
                sample["txt"] = row["caption"].encode()
            writer.write(sample)
            shard_samples += 1
            shard_bytes += len(video)
            written.append(row)
        close_shard()
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        retired = shard_dir.parent / f".{shard_dir.name}-retired-{uuid.uuid4().hex}"
        if shard_dir.exists():
            os.replace(shard_dir, retired)
        os.replace(staging, shard_dir)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        close_shard()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def remove_stale_staging(out_dir: Path) -> None:
    """Leftovers of a killed run (hidden staging/retired dirs, temporary files) are deleted on start."""
    for path in Path(out_dir).rglob(".*"):
        if path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
        elif ("-staging-" in path.name or "-retired-" in path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def read_shard_samples(path: Path) -> list[dict[str, Any]]:
    """Decode a shard with webdataset (what the trainer does): list of {key, json, mp4 bytes, txt}."""
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    samples = []
    for sample in dataset:
        samples.append(
            {
                "key": sample["__key__"],
                "json": json.load(io.BytesIO(sample["json"])),
                "mp4": sample["mp4"],
                "txt": sample.get("txt", b"").decode() or None,
            }
        )
    return samples
