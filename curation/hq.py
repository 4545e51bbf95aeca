"""Stage III high-quality subset (docs/recipe.md §1/§4: ~1M high-quality clips, scored with RAFT at 800x450).

After LVD-F filtering, every kept clip is decoded once more, its 2 fps frame pairs at 800x450 go to
the RAFT actor pool, and `raft_motion` is written into the manifest. The `hq` selection then applies
its own rules to the kept clips that have a RAFT score (the exact rule is ours, [open]): drop the
`hq_drop_low_motion_percent` least moving, the `hq_drop_low_aesthetic_percent` least aesthetic and any
clip with more than `hq_max_text_area` text, then keep at most `hq_max_clips`, best aesthetics first.
Selected clips are written as their own WebDataset shards `OUT/hq/shards/hq-*.tar` and flagged
`hq = true` in the manifest; kept clips not selected get `hq = false`; without RAFT weights nothing is
selected and `hq` stays null (not evaluated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from curation.actors import AnnotateReport, annotate
from curation.config import CurationConfig, FilterRule
from curation.dataset import pending_clip_rows
from curation.filtering import apply_filters
from curation.scorers.config import RaftConfig
from curation.scorers.raft_motion import sample_raft_frames
from curation.types import ClipFrames
from dataformat import (
    MANIFEST_SCHEMA,
    RunLayout,
    atomic_write_json,
    read_parquet_rows,
    write_parquet_atomic,
    write_shards,
)

logger = logging.getLogger(__name__)


def hq_rules(config: RaftConfig) -> list[FilterRule]:
    rules = []
    if config.hq_drop_low_motion_percent is not None:
        rules.append(FilterRule("hq_low_raft_motion", "raft_motion", "percentile", "low",
                                config.hq_drop_low_motion_percent))
    if config.hq_drop_low_aesthetic_percent is not None:
        rules.append(FilterRule("hq_low_aesthetics", "aesthetic_score", "percentile", "low",
                                config.hq_drop_low_aesthetic_percent))
    if config.hq_max_text_area is not None:
        rules.append(FilterRule("hq_text", "text_area", "absolute", "high", config.hq_max_text_area))
    return rules


def select_hq(rows: list[dict[str, Any]], config: RaftConfig) -> tuple[list[str], dict[str, Any]]:
    """Clip ids picked for stage III among LVD-F-kept `rows` with a RAFT score, and what each rule did."""
    candidates = [
        dict(row) for row in rows
        if row.get("keep") and isinstance(row.get("raft_motion"), float) and math.isfinite(row["raft_motion"])
    ]
    summary = apply_filters(candidates, hq_rules(config))
    chosen = [row for row in candidates if row["keep"]]
    chosen.sort(key=lambda r: (-(r.get("aesthetic_score") or -math.inf), -r["raft_motion"], r["clip_id"]))
    if config.hq_max_clips is not None:
        chosen = chosen[: config.hq_max_clips]
    info = {
        "candidates": len(candidates),
        "selected": len(chosen),
        "rules": [{"name": o.rule.name, "column": o.rule.column, "mode": o.rule.mode, "value": o.rule.value,
                   "scored": o.scored, "dropped": o.dropped, "threshold": o.threshold, "skipped": o.skipped}
                  for o in summary.outcomes],
    }
    return sorted(row["clip_id"] for row in chosen), info


def _raft_inputs(rows: list[dict[str, Any]], config: RaftConfig) -> Iterator[ClipFrames]:
    """Frame pairs of each clip, decoded from its clip file (CPU); a clip that fails yields no frames."""
    for row in rows:
        try:
            yield sample_raft_frames(
                row["clip_path"], row["clip_id"], row["fps"], row["end_frame"] - row["start_frame"], config
            )
        except Exception as error:  # noqa: BLE001 - one unreadable clip is an error row, not a failed pass
            logger.warning("%s: cannot sample frames for RAFT: %s", row["clip_id"], error)
            yield ClipFrames(row["clip_id"], np.zeros((0, config.height, config.width, 3), np.uint8))


def hq_uses_ray(config: CurationConfig) -> bool:
    """Whether the hq pass will run RAFT actors (enabled, weights configured, Ray wanted)."""
    raft = config.scorers.raft
    return raft.enabled and not raft.missing_setting() and config.scorers.use_ray


def hq_pass(out: str | Path, config: CurationConfig) -> dict[str, Any]:
    """Score kept clips with RAFT, select the hq subset, write OUT/hq/shards and update the manifest."""
    layout = RunLayout(out)
    raft = config.scorers.raft
    manifest = read_parquet_rows(layout.manifest)
    hq_dir = layout.hq_shards
    skipped = None
    if not raft.enabled:
        skipped = "RAFT hq pass disabled (scorers.raft.enabled=false)"
    elif raft.missing_setting():
        skipped = f"RAFT hq pass off: no weights configured; set {raft.missing_setting()}"
    if skipped:
        logger.warning(skipped)
        atomic_write_json(layout.hq_summary, {"skipped": skipped, "selected": 0})
        return {"skipped": skipped, "selected": 0}
    paths = {row["clip_id"]: row["clip_path"] for row in pending_clip_rows(layout)}
    kept = [{**row, "clip_path": paths.get(row["clip_id"])} for row in manifest if row.get("keep")]
    kept = [row for row in kept if row["clip_path"]]
    report = AnnotateReport()
    scores = annotate(_raft_inputs(kept, raft), config.scorers, names=["raft"], report=report)
    for row in manifest:
        annotation = scores.get(row["clip_id"], {})
        row["raft_motion"] = annotation.get("raft_motion")
        errors = annotation.get("scorer_errors")
        if errors:
            row["scorer_errors"] = list(row.get("scorer_errors") or []) + errors
    selected, info = select_hq(manifest, raft)
    chosen = set(selected)
    for row in manifest:
        row["hq"] = row["clip_id"] in chosen if row.get("keep") else False
    hq_rows = [{**row, "clip_path": paths[row["clip_id"]]} for row in manifest if row["hq"]]
    written = write_shards(hq_rows, hq_dir, config.shards.max_samples, config.shards.max_bytes, prefix="hq")
    write_parquet_atomic(manifest, MANIFEST_SCHEMA, layout.manifest)
    info.update(
        scored=sum(isinstance(scores.get(r["clip_id"], {}).get("raft_motion"), float) for r in kept),
        shards=sorted(p.name for p in hq_dir.glob("*.tar")),
        written=len(written),
        pool=report.as_dict(),
    )
    logger.info("hq: %d of %d kept clips selected for stage III", info["selected"], len(kept))
    atomic_write_json(layout.hq_summary, info)
    return info

