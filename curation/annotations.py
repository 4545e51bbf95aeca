"""Learned-scorer annotations of a curation run, streamed from the decode stage and kept per source.

`annotate_sources` feeds the actor pools (curation/actors.py) with the sampled frames of each source as
soon as that source is committed, and writes `work/annotations/part-<source id>.parquet` once all of a
source's clips are scored. A rerun therefore only scores what is missing: committed sources without
an annotation part (or annotated by fewer scorers than are active now) and the newly processed ones.
`read_annotations` gives `finalize` the {clip_id: columns} it merges into the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from curation.actors import AnnotateReport, annotate
from curation.config import CurationConfig
from curation.dataset import completed_source_ids, load_clip_frames
from curation.scorers.graph import spec_of
from curation.types import ClipFrames
from dataformat import (
    ANNOTATED_COLUMNS,
    ANNOTATION_SCHEMA,
    Column,
    RunLayout,
    parquet_dataset,
    read_parquet_rows,
    source_id,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

def read_annotations(out: str | Path) -> dict[str, dict[str, Any]]:
    """{clip_id: {text_area, aesthetic_score, clip_score, caption, captions, scorer_errors}} of a run."""
    columns = [Column.CLIP_ID, *ANNOTATED_COLUMNS]  # not the CLIP embeddings: the dedup step streams those
    rows = parquet_dataset(RunLayout(out).annotations, ANNOTATION_SCHEMA).to_table(columns=columns).to_pylist()
    return {row[Column.CLIP_ID]: {name: row.get(name) for name in ANNOTATED_COLUMNS} for row in rows}


def _annotated_by(layout: RunLayout) -> dict[str, set[str]]:
    """Source id -> scorers its annotation part was made with."""
    out: dict[str, set[str]] = {}
    for part in layout.annotations.glob("part-*.parquet"):
        rows = read_parquet_rows(part)
        out[part.stem.removeprefix("part-")] = set(rows[0][Column.ANNOTATED_BY] or []) if rows else set()
    return out


def _clip_rows(layout: RunLayout, sid: str) -> list[dict[str, Any]]:
    return read_parquet_rows(layout.clip_rows_part(sid))


def _has_clips(layout: RunLayout, sid: str) -> bool:
    part = layout.clip_rows_part(sid)
    return part.exists() and pq.read_metadata(part).num_rows > 0


def _frames(row: dict[str, Any]) -> ClipFrames:
    """The clip's first/middle/last frames from the JPEG the chain wrote; an unreadable file gives an
    empty ClipFrames, which every scorer turns into an error row."""
    try:
        return load_clip_frames(row)
    except Exception as error:  # noqa: BLE001 - a missing frame file is one bad clip, not a failed run
        logger.warning("%s: cannot read sampled frames %s: %s", row["clip_id"], row.get("frames_path"), error)
        return ClipFrames(clip_id=row["clip_id"], frames=np.zeros((0, 1, 1, 3), np.uint8))


class _PartWriter:
    """Collects finished clips per source and writes the source's part when its last clip is done."""

    def __init__(self, layout: RunLayout, names: list[str]) -> None:
        self.layout, self.names = layout, sorted(names)
        self.expected: dict[str, set[str]] = {}  # source id -> clip ids not yet done
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.source_of: dict[str, str] = {}
        self.parts_written = 0

    def expect(self, sid: str, clip_ids: list[str]) -> None:
        self.expected[sid], self.rows[sid] = set(clip_ids), []
        for clip_id in clip_ids:
            self.source_of[clip_id] = sid

    def done(self, clip_id: str, row: dict[str, Any]) -> None:
        sid = self.source_of.pop(clip_id)
        self.rows[sid].append({"clip_id": clip_id, **row, "annotated_by": self.names})
        self.expected[sid].discard(clip_id)
        if not self.expected[sid]:
            write_parquet_atomic(self.rows.pop(sid), ANNOTATION_SCHEMA, self.layout.annotations_part(sid))
            del self.expected[sid]
            self.parts_written += 1


def annotate_sources(
    out: str | Path,
    config: CurationConfig,
    finished_sources: Iterable[dict[str, Any]] = (),
    expect_sources: bool = True,
) -> AnnotateReport:
    """Score the clips of every committed source that lacks annotations, then of each source in
    `finished_sources` (source rows, as the flow's per-source tasks return them) as it arrives.

    `finished_sources` is always consumed to the end, even when no scorer is active, because the flow
    drives its per-source progress through it. With `expect_sources=False` (nothing pending) and no
    backlog, no model is loaded at all.
    """
    layout = RunLayout(out)
    scorers = config.scorers
    names = scorers.active()
    report = AnnotateReport()
    report.unavailable = {n: why for n, why in scorers.unavailable().items() if spec_of(n).per_clip}
    have = _annotated_by(layout)
    backlog = sorted(
        sid for sid in completed_source_ids(layout)
        if not set(names) <= have.get(sid, set()) and _has_clips(layout, sid)
    )
    if not names or not (backlog or expect_sources):
        for _ in finished_sources:
            pass
        return report
    writer = _PartWriter(layout, names)

    def source_ids() -> Iterator[str]:
        yield from backlog
        seen = set(backlog)
        for result in finished_sources:
            sid = result.get("source_id") or source_id(result["source"])
            if sid not in seen:
                seen.add(sid)
                yield sid

    def clips() -> Iterator[ClipFrames]:
        for sid in source_ids():
            rows = _clip_rows(layout, sid)
            if not rows:
                continue
            writer.expect(sid, [row["clip_id"] for row in rows])
            for row in rows:
                yield _frames(row)

    annotate(clips(), scorers, report=report, on_clip_done=writer.done)
    logger.info("annotated %d clips, %d source parts written", report.clips, writer.parts_written)
    return report
