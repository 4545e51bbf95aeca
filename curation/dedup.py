"""Near-duplicate removal: group clips whose signatures are nearly identical, across every source of a run.

A clip's signature is its mean CLIP image embedding when the CLIP scorer runs (kept by the scorer, so CLIP runs
once), else the perceptual hash of its first, middle and last frame and of their 90 % centre crop
(curation/phash.py). Both are unit vectors here; two clips are near-duplicates when their cosine similarity is at
least `dedup.clip_min_cosine`, or their hashes differ in at most `dedup.phash_max_bits` bits (a cosine, too, for
+-1 vectors). Groups are the connected components of that relation.

Finding the pairs is an inverted-file index (the IVF of FAISS, in numpy; docs/dedup.md says why): spherical
k-means on a sample gives cells of about `dedup.cell_size` items, every item goes into its `dedup.probes` nearest
cells, and only items sharing a cell are compared. Work is O(n x probes^2 x cell size) instead of O(n^2), and
memory is one cell at a time: the signatures stay on disk (`work/dedup/vectors.bin`, read through a memory map),
the index holds n x probes cell numbers and the union-find n integers. Runs of at most twice `cell_size` items are
compared exhaustively.

`find_duplicates(out, config)` is the global step after scoring: it writes `work/dedup/groups.parquet` and
`state.json`, and recomputes nothing when the inputs (the committed parts) and the settings are unchanged, so a
rerun resumes past it. `finalize` then keeps the best clip of each group (`curation.filtering`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import CurationConfig
from curation.phash import SIGNATURE_BYTES, cosine_for_bits
from dataformat import (
    DUPLICATE_GROUPS_SCHEMA,
    Column,
    RunLayout,
    atomic_write_json,
    read_parquet_rows,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

SEED = 0  # k-means sampling and initialisation: the same run groups the same way every time
TRAIN_ITEMS_PER_CELL = 32  # k-means learns the cells from this many sampled items per cell
KMEANS_ITERATIONS = 10
READ_ROWS = 32_768  # items read and assigned to cells at a time
BLOCK_ENTRIES = 4_000_000  # similarity entries computed at a time inside a cell (16 MB of float32)

Reader = Callable[[np.ndarray], np.ndarray]  # item indices (ascending) -> (k, dim) float32 unit vectors


# ------------------------------------------------------------------------------------------ union-find


def find_roots(parent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The roots of `items` in the forest `parent`, compressing their paths on the way."""
    roots = items
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    parent[items] = roots
    return roots


def connect(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of a[i] and b[i] for every i, vectorised: each round hooks the larger root of every
    still-separate pair under the smaller, so a component's root is always its smallest item."""
    while a.size:
        root_a, root_b = find_roots(parent, a), find_roots(parent, b)
        apart = root_a != root_b
        if not apart.any():
            return
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))


# ------------------------------------------------------------------------------------------ the index


def spherical_kmeans(points: np.ndarray, cells: int, rng: np.random.Generator,
                     iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """`cells` unit centroids of unit `points` (cosine k-means); an emptied cell restarts at a random point."""
    centroids = points[rng.choice(len(points), size=cells, replace=False)].copy()
    for _ in range(iterations):
        labels = np.concatenate([np.argmax(block @ centroids.T, axis=1) for block in _row_blocks(points, cells)])
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=cells)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        filled = counts > 0
        sums = np.add.reduceat(points[order], starts[filled], axis=0)
        centroids[filled] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        empty = np.flatnonzero(~filled)
        if empty.size:
            centroids[empty] = points[rng.choice(len(points), size=empty.size, replace=False)]
    return centroids


def _row_blocks(points: np.ndarray, cells: int) -> list[np.ndarray]:
    """`points` in row blocks whose similarities to `cells` centroids hold at most BLOCK_ENTRIES values."""
    rows = max(1, BLOCK_ENTRIES // cells)
    return [points[start : start + rows] for start in range(0, len(points), rows)]


@dataclass
class GroupingStats:
    """What grouping cost: how the items were split and how much was compared."""

    items: int = 0
    cells: int = 0
    largest_cell: int = 0
    compared_pairs: int = 0
    linked_pairs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def auto_cell_size(items: int, probes: int) -> int:
    """The cell size that balances assigning items to cells (n x n / size) against comparing within them
    (n x probes^2 x size): about sqrt(n) / probes, at least 256."""
    return max(256, round(math.sqrt(items) / probes))


def group_vectors(count: int, read: Reader, min_cosine: float, cell_size: int | None = None, probes: int = 2,
                  parent: np.ndarray | None = None) -> tuple[np.ndarray, GroupingStats]:
    """Connected components of "cosine >= min_cosine" over `count` unit vectors read by `read`; returns each
    item's root (the smallest item of its component) and the cost. `parent` may hold links made beforehand."""
    stats = GroupingStats(items=count)
    parent = np.arange(count, dtype=np.int64) if parent is None else parent
    cell_size = cell_size or auto_cell_size(count, probes)
    started = time.perf_counter()
    for members in _cells(count, read, cell_size, probes, stats):
        if members.size < 2:
            continue
        stats.cells += 1
        stats.largest_cell = max(stats.largest_cell, members.size)
        _link_within(members, read(members), min_cosine, parent, stats)
    stats.seconds["compare"] = time.perf_counter() - started - sum(stats.seconds.values())
    return find_roots(parent, np.arange(count, dtype=np.int64)), stats


def _cells(count: int, read: Reader, cell_size: int, probes: int, stats: GroupingStats) -> Iterator[np.ndarray]:
    """Item indices (ascending) of each cell of the index; one cell of everything for small runs."""
    if count <= 2 * cell_size:
        yield np.arange(count, dtype=np.int64)
        return
    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    cells = math.ceil(count / cell_size)
    sample = np.sort(rng.choice(count, size=min(count, cells * TRAIN_ITEMS_PER_CELL), replace=False))
    centroids = spherical_kmeans(read(sample), cells, rng)
    stats.seconds["train"] = time.perf_counter() - started
    probes = min(probes, cells)
    assignment = np.empty((count, probes), dtype=np.int32)
    rows = max(1, min(READ_ROWS, BLOCK_ENTRIES // cells))  # bounds the similarity block whatever the cell count
    for start in range(0, count, rows):
        similarity = read(np.arange(start, min(count, start + rows))) @ centroids.T
        nearest = np.argpartition(-similarity, probes - 1, axis=1)[:, :probes] if probes < cells else \
            np.broadcast_to(np.arange(cells), similarity.shape)
        assignment[start : start + len(similarity)] = nearest
    flat = assignment.ravel()
    order = np.argsort(flat, kind="stable")  # stable: each cell's items stay ascending (fast memory-map reads)
    bounds = np.searchsorted(flat[order], np.arange(cells + 1))
    del assignment, flat
    stats.seconds["assign"] = time.perf_counter() - started - stats.seconds["train"]
    for cell in range(cells):
        members = order[bounds[cell] : bounds[cell + 1]] // probes
        if members.size > 1:
            yield members


def _link_within(members: np.ndarray, vectors: np.ndarray, min_cosine: float, parent: np.ndarray,
                 stats: GroupingStats) -> None:
    """Link every pair of one cell whose cosine reaches `min_cosine`, a block of rows at a time."""
    size = len(members)
    rows = max(1, BLOCK_ENTRIES // size)
    for start in range(0, size, rows):
        similarity = vectors[start : start + rows] @ vectors[start:].T  # the upper triangle's rows
        row, column = np.nonzero(similarity >= min_cosine)
        above = column > row  # columns are offset by `start`: column == row is the item itself
        stats.compared_pairs += similarity.size - similarity.shape[0] * (similarity.shape[0] + 1) // 2
        if above.any():
            stats.linked_pairs += int(above.sum())
            connect(parent, members[start + row[above]], members[start + column[above]])


# ------------------------------------------------------------------------------------------ the run step


@dataclass
class Signatures:
    """The run's signatures written to the scratch file: which clip each item belongs to and how to read it."""

    method: str
    clip_ids: pa.Array  # clips with a signature, in item order (clip_ids[item_clip[i]] owns item i)
    item_clip: np.ndarray  # item -> index into clip_ids
    dim: int
    min_cosine: float
    unsigned: int  # clips without a signature (the CLIP scorer failed on them, or an older run): never grouped


def _records(part: Path, column: str) -> Iterator[tuple[str, bytes | None]]:
    """(clip id, signature) of one part, reading only those two columns; a part written by a version that kept
    no signatures gives None for each of its clips (never grouped)."""
    if not part.exists():
        return
    columns = pq.ParquetFile(part).schema_arrow.names
    table = pq.read_table(part, columns=[Column.CLIP_ID, *([column] if column in columns else [])])
    clip_ids = table.column(Column.CLIP_ID).to_pylist()
    signatures = table.column(column).to_pylist() if column in columns else [None] * len(clip_ids)
    yield from zip(clip_ids, signatures, strict=True)


def _parts(layout: RunLayout, method: str) -> list[tuple[str, Path]]:
    """(source id, part holding its clips' signatures) of every committed source, in source-id order."""
    sids = sorted(layout.committed_source_ids())
    if method == "clip":
        return [(sid, layout.annotations_part(sid)) for sid in sids]
    return [(sid, layout.clip_rows_part(sid)) for sid in sids]


def write_signatures(layout: RunLayout, method: str, config: CurationConfig) -> Signatures:
    """Stream every committed clip's signature into `work/dedup/vectors.bin` (one fixed-size record per item)."""
    column = Column.CLIP_EMBEDDING if method == "clip" else Column.FRAME_HASH
    items_per_clip = 1 if method == "clip" else 2  # a hash and its crop's hash
    clip_ids: list[str] = []
    unsigned, expected = 0, None if method == "clip" else SIGNATURE_BYTES
    layout.dedup.mkdir(parents=True, exist_ok=True)
    with open(layout.dedup_vectors, "wb") as handle:
        for _, part in _parts(layout, method):
            for clip_id, signature in _records(part, column):
                if signature is None:
                    unsigned += 1
                    continue
                expected = expected or len(signature)
                if len(signature) != expected:
                    raise ValueError(f"{clip_id}: its {column} has {len(signature)} bytes where the run's others have "
                                     f"{expected} (clips scored by different CLIP models); curate into a new directory")
                handle.write(signature)
                clip_ids.append(clip_id)
    items = np.repeat(np.arange(len(clip_ids), dtype=np.int64), items_per_clip)
    if method == "clip":
        dim, min_cosine = (expected or 2) // 2, config.dedup.clip_min_cosine
    else:
        dim, min_cosine = SIGNATURE_BYTES // 2 * 8, cosine_for_bits(config.dedup.phash_max_bits)
    return Signatures(method, pa.array(clip_ids, pa.string()), items, dim, min_cosine, unsigned)


def signature_reader(path: Path, method: str, dim: int) -> tuple[int, Reader]:
    """(items, read) over the scratch file: float16 embeddings, or 24-byte hashes as +-1/sqrt(192) vectors."""
    record = dim * 2 if method == "clip" else dim // 8
    size = path.stat().st_size
    if size == 0:
        return 0, lambda rows: np.zeros((len(rows), dim), np.float32)
    data = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // record, record))

    def read(rows: np.ndarray) -> np.ndarray:
        block = np.asarray(data[rows])
        if method == "clip":
            return block.view("<f2").astype(np.float32)
        return (np.unpackbits(block, axis=1).astype(np.float32) * 2.0 - 1.0) / np.float32(math.sqrt(dim))

    return len(data), read


def _fingerprint(layout: RunLayout, method: str, config: CurationConfig) -> str:
    """What the groups depend on: the method, its settings, and every input part (name, size, modification)."""
    settings = {name: value for name, value in asdict(config.dedup).items() if name != "keep_best"}  # finalize's
    digest = hashlib.sha256(json.dumps([method, settings], sort_keys=True, default=str).encode())
    for sid, part in _parts(layout, method):
        stat = part.stat() if part.exists() else None
        digest.update(f"{sid}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1};".encode())
    return digest.hexdigest()


def find_duplicates(out: str | Path, config: CurationConfig) -> dict[str, Any]:
    """Group the run's near-duplicate clips into `work/dedup/groups.parquet`; returns the step's summary (also in
    `work/dedup/state.json`). Unchanged inputs and settings: the saved result, nothing recomputed."""
    layout = RunLayout(out)
    method = config.dedup_method()
    if method is None:
        layout.duplicate_groups.unlink(missing_ok=True)
        layout.dedup_state.unlink(missing_ok=True)
        return {"method": None}
    fingerprint = _fingerprint(layout, method, config)
    if layout.dedup_state.exists() and layout.duplicate_groups.exists():
        state = json.loads(layout.dedup_state.read_text())
        if state.get("fingerprint") == fingerprint:
            return {**state, "reused": True}
    started = time.perf_counter()
    signatures = write_signatures(layout, method, config)
    items, read = signature_reader(layout.dedup_vectors, method, signatures.dim)
    parent = np.arange(items, dtype=np.int64)
    if method == "phash":  # a clip's two items (its hash and its crop's) are one clip
        connect(parent, np.arange(0, items, 2), np.arange(1, items, 2))
    try:
        roots, stats = group_vectors(items, read, signatures.min_cosine, config.dedup.cell_size,
                                     config.dedup_probes(method), parent)
    finally:
        layout.dedup_vectors.unlink(missing_ok=True)
    clip_roots = np.full(len(signatures.clip_ids), -1, dtype=np.int64)
    clip_roots[signatures.item_clip] = signatures.item_clip[roots]  # roots are first items: one per clip
    sizes = np.bincount(clip_roots, minlength=len(clip_roots)) if len(clip_roots) else np.zeros(0, np.int64)
    grouped = np.flatnonzero(sizes[clip_roots] > 1) if len(clip_roots) else np.zeros(0, np.int64)
    members = signatures.clip_ids.take(pa.array(grouped)).to_pylist()
    names = signatures.clip_ids.take(pa.array(clip_roots[grouped])).to_pylist()
    write_parquet_atomic([{Column.CLIP_ID: c, Column.GROUP: g} for c, g in zip(members, names, strict=True)],
                         DUPLICATE_GROUPS_SCHEMA, layout.duplicate_groups)
    state = {
        "fingerprint": fingerprint, "method": method, "min_cosine": signatures.min_cosine,
        "clips": len(signatures.clip_ids) + signatures.unsigned, "unsigned": signatures.unsigned,
        "groups": int((sizes > 1).sum()), "in_groups": len(members),
        "duplicates": len(members) - int((sizes > 1).sum()),
        "index": {"items": stats.items, "cells": stats.cells, "largest_cell": stats.largest_cell,
                  "compared_pairs": stats.compared_pairs, "linked_pairs": stats.linked_pairs},
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(layout.dedup_state, state)
    logger.info("near-duplicates (%s): %d groups holding %d of %d clips", method, state["groups"], len(members),
                state["clips"])
    return {**state, "reused": False}


def read_duplicate_groups(out: str | Path) -> dict[str, str]:
    """{clip_id: group} of the clips that have near-duplicates (written by `find_duplicates`)."""
    return {row[Column.CLIP_ID]: row[Column.GROUP] for row in read_parquet_rows(RunLayout(out).duplicate_groups)}
