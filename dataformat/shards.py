"""WebDataset shards: writing a run's clips, and one seekable index that every reader uses.

A shard is a plain tar of samples `KEY.mp4` (the clip), `KEY.json` (its manifest row, every manifest
column) and `KEY.txt` (its caption, when it has one), so `webdataset`, `tar` or this index all read it.
The index reads tar headers only (key -> member offsets); any member is then one seek and one read.
Shards are written into a hidden staging directory that replaces the target directory in one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dataformat.atomic import fsync_directory
from dataformat.layout import RunLayout
from dataformat.schema import MANIFEST_SCHEMA, Column, select_columns
from dataformat.shard_keys import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, SampleKey, sample_key


class DataError(ValueError):
    """Data on disk is missing or unusable (no shards, a broken tar, a clip shorter than its row says)."""


# ------------------------------------------------------------------------------------------- writing


def sample_json(row: dict[str, Any], schema: pa.Schema = MANIFEST_SCHEMA) -> bytes:
    """The `KEY.json` payload: the clip's manifest row, every column of `schema` (the manifest's, or the orbit
    manifest's with its cameras) and nothing else."""
    return json.dumps(select_columns(row, schema), sort_keys=True).encode()


def write_shards(
    rows: Iterable[dict[str, Any]], shard_dir: Path, max_samples: int, max_bytes: int, prefix: str = "shard",
    schema: pa.Schema = MANIFEST_SCHEMA,
) -> list[dict[str, Any]]:
    """Write clips (`clip_path` must exist) as shards `PREFIX-NNNNNN.tar` into a staged directory that
    atomically replaces `shard_dir`; each `KEY.json` holds the row's `schema` columns. Sets `shard` and `key`
    on each row; returns the rows written."""
    import webdataset as wds

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
            video = Path(row[Column.CLIP_PATH]).read_bytes()
            shard_full = shard_samples >= max_samples or (shard_samples > 0 and shard_bytes + len(video) > max_bytes)
            if writer is None or shard_full:
                if writer is not None:
                    close_shard()
                    shard_index += 1
                open_shard()
                shard_samples, shard_bytes = 0, 0
            key = sample_key(row[Column.CLIP_ID])
            row[Column.SHARD] = f"{shard_dir.name}/{prefix}-{shard_index:06d}.tar"
            row[Column.KEY] = key
            sample = {"__key__": key, SampleKey.VIDEO: video, SampleKey.META: sample_json(row, schema)}
            if row.get(Column.CAPTION):
                sample[SampleKey.TEXT] = row[Column.CAPTION].encode()
            writer.write(sample)
            shard_samples += 1
            shard_bytes += len(video)
            written.append(row)
        close_shard()
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(staging)
        retired = shard_dir.parent / f".{shard_dir.name}-retired-{uuid.uuid4().hex}"
        if shard_dir.exists():
            os.replace(shard_dir, retired)
        os.replace(staging, shard_dir)
        fsync_directory(shard_dir.parent)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        close_shard()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Member:
    """Where one member's bytes are: shard path, byte offset, size."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass(frozen=True)
class IndexedSample:
    """One sample of a shard: its key and extension -> member."""

    key: str
    members: dict[str, Member]

    @property
    def is_image(self) -> bool:
        return any(ext in self.members for ext in IMAGE_EXTENSIONS)

    @property
    def is_video(self) -> bool:
        return any(ext in self.members for ext in VIDEO_EXTENSIONS)

    @property
    def video_extension(self) -> str | None:
        return next((ext for ext in VIDEO_EXTENSIONS if ext in self.members), None)

    @property
    def image_extension(self) -> str | None:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)

    def meta(self) -> dict[str, Any]:
        """The sample's `KEY.json` (its manifest row for curated clips); {} when it has none."""
        member = self.members.get(SampleKey.META)
        return json.loads(member.read()) if member else {}

    def text(self) -> str | None:
        """The sample's `KEY.txt` (stripped), None when it has none."""
        member = self.members.get(SampleKey.TEXT)
        return member.read().decode("utf-8").strip() if member else None


def find_shards(data: str | Path) -> list[str]:
    """The .tar shards of a run directory (its shards/), a folder of shards, or one .tar."""
    path = Path(data)
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    for folder in (RunLayout(path).shards, path):
        if folder.is_dir():
            shards = sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))
            if shards:
                return shards
    raise DataError(f"no WebDataset shards (*.tar) under {str(data)!r}: pass a curate-lvd output directory "
                    "(it has shards/) or a folder of .tar shards; has curate-lvd run?")


def _sample_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a WebDataset member, or None for what is not a sample's file
    (directories, links, names without an extension, hidden files)."""
    directory, _, base = info.name.rpartition("/")
    stem, _, extension = base.partition(".")
    if not info.isfile() or not extension or base.startswith("."):
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def index_shards(shards: Iterable[str | Path], media_only: bool = True) -> list[IndexedSample]:
    """Read the tar headers of every shard: one entry per sample key, in shard order. With `media_only`,
    samples without a video or image member are left out."""
    samples: dict[tuple[str, str], dict[str, Member]] = {}
    for shard in map(str, shards):
        try:
            with tarfile.open(shard, "r:") as archive:
                for info in archive:
                    if (named := _sample_member(info)) is not None:
                        key, extension = named
                        samples.setdefault((shard, key), {})[extension] = Member(shard, info.offset_data, info.size)
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"shard {shard} is not a readable tar file: {error}") from error
    indexed = [IndexedSample(key, members) for (_, key), members in samples.items()]
    return [s for s in indexed if s.is_image or s.is_video] if media_only else indexed


@dataclass(frozen=True)
class ShardScan:
    """What one shard's tar headers say, without raising: its samples (every member wholly inside the file) and
    its problems as (key or None for the whole shard, one-line reason)."""

    shard: str
    samples: list[IndexedSample]
    problems: list[tuple[str | None, str]]


def scan_shard(shard: str | Path) -> ShardScan:
    """Index one shard like `index_shards`, but report an unreadable, empty or truncated tar instead of raising:
    a sample with a member cut off by the end of the file, or the last one read before the tar broke off, is a
    problem named by key; a tar that yields no sample at all is a problem of the whole shard."""
    shard = str(shard)
    members: dict[str, dict[str, Member]] = {}
    problems: list[tuple[str | None, str]] = []
    truncated: set[str] = set()
    last_key = None
    try:
        size = os.path.getsize(shard)
        with tarfile.open(shard, "r:") as archive:
            for info in archive:
                if (named := _sample_member(info)) is None:
                    continue
                key, extension = named
                last_key = key
                members.setdefault(key, {})[extension] = Member(shard, info.offset_data, info.size)
                if info.offset_data + info.size > size:
                    truncated.add(key)
    except (tarfile.TarError, OSError, EOFError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if last_key is None:
            problems.append((None, f"not a readable tar file ({reason})"))
        else:
            truncated.discard(last_key)
            problems.append((last_key, f"truncated tar: it breaks off at this sample ({reason})"))
    if not members and not problems:
        problems.append((None, "tar holds no samples"))
    problems += [(key, "truncated tar: a member is cut off by the end of the shard") for key in sorted(truncated)]
    truncated |= {key for key, _ in problems if key is not None}
    samples = [IndexedSample(key, found) for key, found in members.items() if key not in truncated]
    return ShardScan(shard, samples, problems)


def read_shard_samples(shard: str | Path) -> Iterator[dict[str, Any]]:
    """Each sample of a shard as {key, json (dict), mp4 (bytes or None), txt (str or None)}."""
    for sample in index_shards([shard], media_only=False):
        video = sample.members.get(SampleKey.VIDEO)
        yield {"key": sample.key, "json": sample.meta(), "mp4": video.read() if video else None,
               "txt": sample.text() or None}
