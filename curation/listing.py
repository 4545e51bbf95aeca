"""The input listing of a curation run, streamed: LVD has 577M sources, so no list of them is ever built.

`iter_sources` walks the input one directory at a time (local folders with `os.scandir`, URLs through
fsspec's `ls`), so the driver holds the names of the directories on the current path, not the listing.
Each directory's entries are sorted, which makes the walk deterministic and yields exactly the order of
sorting every relative path (a directory sorts as its name plus "/"). A flat directory of N objects still
costs N names in memory while it is walked; lay huge inputs out in sub-directories (prefixes).

`pending_sources` drops the sources OUT has committed by looking for each one's source row, and
`source_batches` groups what is left into the batches one Prefect task run curates.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from dataformat import RunLayout


def is_remote(input_root: str | Path) -> bool:
    """A URL such as s3://bucket/raw or gs://... (any fsspec protocol) rather than a local path."""
    return "://" in str(input_root)


def iter_sources(input_root: str | Path, extensions: tuple[str, ...]) -> Iterator[str]:
    """Relative paths of the video files under `input_root`, in sorted order, streamed (broken links
    included: they become error rows; linked directories are not followed).

    `input_root` may be an fsspec URL (s3://, gs://, ...: install the matching fsspec backend). A missing
    input raises FileNotFoundError when the iteration starts.
    """
    extensions = tuple(extension.lower() for extension in extensions)
    if is_remote(input_root):
        yield from _iter_remote(str(input_root), extensions)
        return
    root = Path(input_root)
    if not root.exists():
        raise FileNotFoundError(f"input path {root} does not exist")
    if root.is_file():
        yield root.name
        return
    yield from _walk_local(str(root), "", extensions)


def _walk_local(directory: str, prefix: str, extensions: tuple[str, ...]) -> Iterator[str]:
    try:
        with os.scandir(directory) as scan:
            entries = sorted(((entry.name + "/" if _is_real_dir(entry) else entry.name), entry.path)
                             for entry in scan if not (entry.is_symlink() and _is_dir(entry)))
    except OSError:  # an unreadable sub-directory is skipped, as os.walk does
        return
    for name, path in entries:
        if name.endswith("/"):
            yield from _walk_local(path, prefix + name, extensions)
        elif name.lower().endswith(extensions):
            yield prefix + name


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_real_dir(entry: os.DirEntry) -> bool:
    return _is_dir(entry) and not entry.is_symlink()


def _iter_remote(url: str, extensions: tuple[str, ...]) -> Iterator[str]:
    import fsspec

    filesystem, root_path = fsspec.core.url_to_fs(url)
    if not filesystem.exists(root_path):
        raise FileNotFoundError(f"input path {url} does not exist")
    if filesystem.isfile(root_path):
        yield root_path.rstrip("/").rsplit("/", 1)[-1]
        return
    yield from _walk_remote(filesystem, root_path.rstrip("/"), "", extensions)


def _walk_remote(filesystem, directory: str, prefix: str, extensions: tuple[str, ...]) -> Iterator[str]:
    start = len(directory) + 1
    entries = []  # one string per entry: its name, with "/" appended for a directory
    for info in filesystem.ls(directory, detail=True):
        path = info["name"].rstrip("/")
        if path == directory:  # some stores list the directory itself
            continue
        name = path[start:] if path.startswith(directory + "/") else path.rsplit("/", 1)[-1]
        entries.append(name + "/" if info.get("type") == "directory" else name)
    entries.sort()
    for name in entries:
        if name.endswith("/"):
            yield from _walk_remote(filesystem, f"{directory}/{name[:-1]}", prefix + name, extensions)
        elif name.lower().endswith(extensions):
            yield prefix + name


def pending_sources(layout: RunLayout, sources: Iterable[str]) -> Iterator[str]:
    """The sources OUT has not committed (no source row in place), streamed: one file check per source, so
    neither the listing nor the set of committed sources is held in memory."""
    for relative_path in sources:
        if not layout.is_committed(relative_path):
            yield relative_path


def source_batches(sources: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive batches of at most `size` sources (the last one may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    iterator = iter(sources)
    while batch := list(islice(iterator, size)):
        yield batch


def batch_size(pending: int, workers: int, sources_per_task: int) -> int:
    """`sources_per_task`, shrunk when there are too few pending sources to give every worker a batch (a
    small run keeps all CPUs busy; a large one gets full batches)."""
    return max(1, min(sources_per_task, math.ceil(pending / max(1, workers))))
