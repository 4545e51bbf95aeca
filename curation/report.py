"""The LVD-F report of a curation run: what each filter removed, so a person can judge the thresholds (the
paper picked them by human preference), and how the run went.

`write_report(OUT, config)` reads the finished run (manifest, summary.json, the sampled frames of each
clip, hq/summary.json) and writes OUT/report.md with:
- sources read and failed (with each error), clips kept, how clip files were cut, the shards written;
- counts per rule, clips dropped by that rule alone, kept fraction;
- the overlap between rules (clips dropped by both);
- PNG histograms per score, kept and dropped stacked, with each rule's threshold drawn in;
- one contact sheet per rule: first/middle/last frame of the clips it dropped, most extreme first;
- near-duplicates: the signature used, groups found, clips removed, and the largest groups side by side (kept first);
- which learned scorers ran (and which setting switches the others on), captions, the hq subset.
`build_report` returns the same text for the Prefect markdown artifact (`lvd-f-report`) with every figure
embedded as a base64 data URI (the Prefect UI cannot load the run's local files), downscaled so that all
of them together stay under `ARTIFACT_IMAGE_BYTES` (900 kB of base64 text; the whole artifact stays
under 1 MB). A figure that cannot fit its share is given as its path and, for a score, a text histogram.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curation.config import CurationConfig
from curation.dataset import pending_clip_rows
from curation.filtering import DUPLICATE
from curation.scorers.graph import SCORERS, settings_of
from dataformat import SCORE_COLUMNS, Column, RunLayout, atomic_write, read_parquet_rows

SHEET_CLIPS = 6
GROUP_EXAMPLES = 4  # near-duplicate groups shown, largest first
GROUP_MEMBERS_SHOWN = 6  # middle frames per group row
SHEET_FRAME_HEIGHT = 96
ARTIFACT_IMAGE_BYTES = 900_000  # base64 text of all figures embedded in the Prefect artifact together
ARTIFACT_MAX_WIDTH = 640  # px; wider figures are scaled down before embedding
MIN_EMBED_WIDTH = 160  # px; a figure that only fits narrower than this is linked instead


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def text_histogram(values: list[Any], bins: int = 8, width: int = 24) -> str:
    """A fixed-width histogram that renders in any markdown viewer (the Prefect UI included)."""
    values = [v for v in values if _finite(v)]
    if not values:
        return "_no scores_"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / span * bins))] += 1
    peak = max(counts)
    lines = []
    for i, count in enumerate(counts):
        left = low + span * i / bins
        bar = "#" * round(width * count / peak) if peak else ""
        lines.append(f"{left:10.4f} | {bar:<{width}} {count}")
    return "```\n" + "\n".join(lines) + "\n```"


def rule_overlap(rows: list[dict[str, Any]], rule_names: list[str]) -> dict[str, dict[str, int]]:
    """overlap[a][b] = clips dropped by both rule a and rule b (diagonal: dropped by a)."""
    dropped = {name: {r["clip_id"] for r in rows if name in (r.get("drop_reasons") or [])} for name in rule_names}
    return {a: {b: len(dropped[a] & dropped[b]) for b in rule_names} for a in rule_names}


def only_by(rows: list[dict[str, Any]], rule_name: str) -> int:
    """Clips that this rule alone dropped (every other rule kept them)."""
    return sum((r.get("drop_reasons") or []) == [rule_name] for r in rows)


def histogram_png(rows: list[dict[str, Any]], column: str, thresholds: list[tuple[str, float]], path: Path) -> bool:
    """Histogram of `column`, kept and dropped clips stacked, rule thresholds as vertical lines."""
    kept = [r[column] for r in rows if _finite(r.get(column)) and r.get("keep")]
    dropped = [r[column] for r in rows if _finite(r.get(column)) and not r.get("keep")]
    if not kept and not dropped:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.0, 2.8), dpi=90)
    values = kept + dropped
    bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 2)))
    axis.hist([kept, dropped], bins=bins, stacked=True, color=["#2b8a3e", "#c92a2a"], label=["kept", "dropped"])
    for name, value in thresholds:
        axis.axvline(value, color="black", linestyle="--", linewidth=1)
        axis.annotate(name, (value, axis.get_ylim()[1] * 0.9), fontsize=7, rotation=90, ha="right")
    axis.set_xlabel(column)
    axis.set_ylabel("clips")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def _strip(row: dict[str, Any], label: str) -> np.ndarray:
    """first | middle | last frame of a clip at a fixed height, with a label bar underneath."""
    height = SHEET_FRAME_HEIGHT
    image = cv2.imread(str(row.get("frames_path") or ""), cv2.IMREAD_COLOR)
    if image is None:
        frames = [np.full((height, height * 16 // 9, 3), 60, np.uint8)]
    else:
        third = image.shape[0] // 3
        frames = [image[i * third : (i + 1) * third] for i in range(3)]
        frames = [cv2.resize(f, (max(1, round(f.shape[1] * height / f.shape[0])), height)) for f in frames]
    strip = np.concatenate([np.pad(f, ((0, 0), (0, 4), (0, 0))) for f in frames], axis=1)
    label_lines = label.splitlines()
    bar = np.full((6 + 14 * len(label_lines), strip.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(label_lines):
        cv2.putText(bar, text, (4, 13 + 14 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, bar], axis=0)


def contact_sheet(rows: list[dict[str, Any]], column: str, path: Path) -> bool:
    """Stack clip strips (already in display order) into one PNG; False when there is nothing to show."""
    if not rows:
        return False
    strips = []
    for row in rows:
        value = row.get(column)
        shown = f"{value:.4g}" if _finite(value) else "n/a"
        strips.append(_strip(row, f"{row['clip_id']}  {column}={shown}\ndropped by: {', '.join(row['drop_reasons'])}"))
    width = max(s.shape[1] for s in strips)
    padded = [np.pad(s, ((0, 6), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    ok, encoded = cv2.imencode(".png", np.concatenate(padded, axis=0))
    if not ok:
        raise ValueError(f"cannot encode the contact sheet {path.name} as PNG")
    atomic_write(path, encoded.tobytes())  # a write that fails (disk full, ...) raises: it fails the run
    return True


def _thumbnail(row: dict[str, Any], label: str, colour: tuple[int, int, int]) -> np.ndarray:
    """The clip's middle frame at the sheet height, with a coloured label bar."""
    height = SHEET_FRAME_HEIGHT
    image = cv2.imread(str(row.get("frames_path") or ""), cv2.IMREAD_COLOR)
    if image is None:
        frame = np.full((height, height * 16 // 9, 3), 60, np.uint8)
    else:
        third = image.shape[0] // 3
        frame = image[third : 2 * third]
        frame = cv2.resize(frame, (max(1, round(frame.shape[1] * height / frame.shape[0])), height))
    bar = np.full((20, frame.shape[1], 3), colour, np.uint8)
    cv2.putText(bar, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.pad(np.concatenate([frame, bar], axis=0), ((0, 0), (0, 6), (0, 0)), constant_values=255)


def duplicate_groups_sheet(groups: list[list[dict[str, Any]]], path: Path) -> bool:
    """One row per near-duplicate group: the kept clip's middle frame, then its duplicates'; False if none."""
    if not groups:
        return False
    rows = []
    for members in groups:
        cells = [_thumbnail(row, "kept" if row.get(Column.DUPLICATE_OF) is None else "duplicate",
                            (43, 138, 62) if row.get(Column.DUPLICATE_OF) is None else (42, 42, 201))
                 for row in members[:GROUP_MEMBERS_SHOWN]]
        rows.append(np.concatenate(cells, axis=1))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 8), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    ok, encoded = cv2.imencode(".png", np.concatenate(padded, axis=0))
    if not ok:
        raise ValueError(f"cannot encode the duplicate-groups sheet {path.name} as PNG")
    atomic_write(path, encoded.tobytes())
    return True


def _duplicates_section(rows: list[dict[str, Any]], summary: dict[str, Any], figures: Path,
                        out: Path) -> list[str]:
    """Near-duplicate removal: method, counts, and the largest groups (kept clip first)."""
    result = summary.get("duplicates") or {}
    lines = ["", "## Near-duplicates", ""]
    if not result.get("method"):
        return [*lines, "- off (dedup.enabled=false)" if result else "- not run"]
    signature = ("mean CLIP image embedding, cosine >= " f"{result['min_cosine']:.3g}" if result["method"] == "clip"
                 else f"perceptual hash of first/middle/last frame, cosine >= {result['min_cosine']:.3g} of +-1 bits")
    lines += [f"- signature: {result['method']} ({signature})",
              f"- clips compared: {result['clips'] - result['unsigned']} of {result['clips']}"
              + (f" ({result['unsigned']} without a signature are never grouped)" if result["unsigned"] else ""),
              f"- groups: **{result['groups']}** holding {result['in_groups']} clips; removed as duplicates: "
              f"**{result['duplicates']}** (one clip kept per group)"]
    kept_of = {r[Column.CLIP_ID]: r for r in rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(Column.DUPLICATE_OF):
            groups.setdefault(row[Column.DUPLICATE_OF], []).append(row)
    examples = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))[:GROUP_EXAMPLES]
    members = [[kept_of[kept], *duplicates] for kept, duplicates in examples if kept in kept_of]
    sheet = figures / "duplicate_groups.png"
    if duplicate_groups_sheet(members, sheet):
        lines += ["", "Largest groups (middle frames; the kept clip first):", "",
                  f"![duplicate groups]({sheet.relative_to(out)})", ""]
        for group in members:
            lines.append(f"- kept `{group[0][Column.CLIP_ID]}` ({group[0][Column.SOURCE]}); duplicates: "
                         + ", ".join(f"`{r[Column.CLIP_ID]}` ({r[Column.SOURCE]})" for r in group[1:]))
    return lines


def _scorer_status(config: CurationConfig, rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(scorer, status, clips with an error from it)."""
    scorers = config.scorers
    unavailable = scorers.unavailable()
    out = []
    for spec in SCORERS.values():
        name, cfg = spec.name, settings_of(scorers, spec.name)
        if not cfg.enabled:
            status = f"disabled (scorers.{name}.enabled=false)"
        elif name in unavailable:
            status = unavailable[name]
        elif hasattr(cfg, "resolved_backend"):  # a scorer with a choice of detectors says which one ran
            status = f"ran: {cfg.resolved_backend()} detector -> {spec.report_label}"
        else:
            status = f"ran -> {spec.report_label}"
        errors = sum(any(str(e).startswith(spec.errors_start) for e in (r.get("scorer_errors") or [])) for r in rows)
        out.append((name, status, errors))
    if scorers.clip.enabled and "clip" not in unavailable and not scorers.clip.aesthetic_weights:
        out.append(("aesthetics", "off: set scorers.clip.aesthetic_weights (LAION predictor .pth)", 0))
    return out


def build_report(out: str | Path, config: CurationConfig) -> tuple[str, str]:
    """Write figures under OUT/report/ and return (report.md text, Prefect artifact text)."""
    layout = RunLayout(out)
    figures = layout.report_figures
    manifest = read_parquet_rows(layout.manifest)
    frames = {r[Column.CLIP_ID]: r.get(Column.FRAMES_PATH) for r in pending_clip_rows(layout)}
    rows = [{**r, Column.FRAMES_PATH: frames.get(r[Column.CLIP_ID]),
             Column.DROP_REASONS: list(r.get(Column.DROP_REASONS) or [])} for r in manifest]
    summary = json.loads(layout.summary.read_text()) if layout.summary.exists() else {}
    hq = json.loads(layout.hq_summary.read_text()) if layout.hq_summary.exists() else None
    rules = summary.get("rules", [])
    total, kept = len(rows), sum(bool(r.get(Column.KEEP)) for r in rows)
    methods = summary.get("clip_methods", {})
    lines = [
        "# LVD-F curation report",
        "",
        f"- sources: {summary.get('sources', '?')} ({summary.get('sources_ok', '?')} ok, "
        f"{summary.get('sources_error', 0)} could not be read)",
        f"- clips: **{total}**, kept: **{kept}** ({kept / total:.1%} kept)" if total else "- clips: **0**",
        f"- dropped: {total - kept}; a clip can be dropped by several rules (see the overlap table)",
        f"- clip files: {methods.get('exact-copy', 0)} exact copies (edit lists), {methods.get('keyframe', 0)} "
        f"copied between keyframes, {methods.get('reencode', 0)} re-encoded",
        f"- shards: {', '.join(summary.get('shards', [])) or 'none'}",
        "",
        "## What each rule removed",
        "",
        "| rule | column | rule | threshold | scored | dropped | dropped by this rule alone | examples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sheets: dict[str, str] = {}
    for rule in rules:
        name = rule["name"]
        dropped_rows = [r for r in rows if name in r["drop_reasons"]]
        reverse = rule["drop"] == "high"
        dropped_rows.sort(key=lambda r: (r.get(rule["column"]) if _finite(r.get(rule["column"])) else 0.0),
                          reverse=reverse)
        sheet = figures / f"dropped_{name}.png"
        if contact_sheet(dropped_rows[:SHEET_CLIPS], rule["column"], sheet):
            sheets[name] = str(sheet.relative_to(layout.out))
        threshold = "-" if rule.get("threshold") is None else f"{rule['threshold']:.4g}"
        kind = f"{rule['mode']} {rule['value']:g}{'%' if rule['mode'] == 'percentile' else ''} ({rule['drop']})"
        if name == DUPLICATE:
            kind = f"near-duplicate ({(summary.get('duplicates') or {}).get('method')}, {rule['value']:g})"
        dropped = rule["skipped"] if rule.get("skipped") else str(rule["dropped"])
        example = f"[sheet]({sheets[name]})" if name in sheets else "-"
        lines.append(f"| {name} | {rule['column']} | {kind} | {threshold} | {rule['scored']} | {dropped} "
                     f"| {only_by(rows, name)} | {example} |")
    names = [rule["name"] for rule in rules if not rule.get("skipped")]
    if names:
        overlap = rule_overlap(rows, names)
        lines += ["", "## Overlap between rules (clips dropped by both)", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {a} | " + " | ".join(str(overlap[a][b]) for b in names) + " |" for a in names]
    errors = summary.get("errors") or {}
    if errors:
        lines += ["", "## Sources with errors", "", "| source | error |", "|---|---|"]
        lines += [f"| {source} | {error} |" for source, error in sorted(errors.items())]
    lines += ["", "## Score distributions (kept green, dropped red; dashed: rule thresholds)", ""]
    for column in SCORE_COLUMNS:
        thresholds = [(r["name"], r["threshold"]) for r in rules
                      if r["column"] == column and _finite(r.get("threshold"))]
        figure = figures / f"hist_{column}.png"
        if histogram_png(rows, column, thresholds, figure):
            lines.append(f"![{column}]({figure.relative_to(layout.out)})")
        else:
            lines.append(f"- {column}: no scores in this run")
    if sheets:
        lines += ["", "## Dropped examples (first | middle | last frame; most extreme first)"]
        for name, sheet in sheets.items():
            lines += ["", f"### {name}", "", f"![{name}]({sheet})"]
    lines += _duplicates_section(rows, summary, figures, layout.out)
    lines += ["", "## Learned scorers", "", "| scorer | status | clips with errors |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {errors} |" for name, status, errors in _scorer_status(config, rows)]
    captioned = [r for r in rows if r.get("caption")]
    kinds = {kind: sum(bool((r.get(Column.CAPTIONS) or {}).get(kind)) for r in rows)
             for kind in ("video", "llm_summary")}
    lines += ["", f"Captions: {len(captioned)} of {total} clips have a CoCa caption, {kinds['video']} a video "
              f"caption, {kinds['llm_summary']} an LLM summary."]
    if captioned:
        lines += [f"- `{r['clip_id']}`: {r['caption']}" for r in captioned[:5]]
    lines += ["", "## Stage III high-quality subset (RAFT)"]
    if hq is None:
        lines.append("- not run")
    elif hq.get("skipped"):
        lines.append(f"- {hq['skipped']}")
    else:
        lines.append(f"- {hq['selected']} of {hq['candidates']} kept clips with a RAFT score selected "
                     f"-> OUT/hq/shards ({', '.join(hq.get('shards', [])) or 'no shards'})")
        for rule in hq.get("rules", []):
            threshold = "-" if rule.get("threshold") is None else f"{rule['threshold']:.4g}"
            lines.append(f"- {rule['name']}: {rule['column']} {rule['mode']} {rule['value']:g}, dropped "
                         f"{rule['skipped'] or rule['dropped']} (threshold {threshold})")
    markdown = "\n".join(lines) + "\n"
    return markdown, artifact_markdown(markdown, layout, rows)


def inline_figure(path: Path, alt: str, max_chars: int, photo: bool) -> str | None:
    """`![alt](data:...)` of a figure scaled down until its base64 text is at most `max_chars` (PNG for
    plots, JPEG for the photos of contact sheets); None when it does not fit at a readable width."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    width = min(image.shape[1], ARTIFACT_MAX_WIDTH)
    while width >= MIN_EMBED_WIDTH:
        height = max(1, round(image.shape[0] * width / image.shape[1]))
        scaled = image if width == image.shape[1] else cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        if photo:
            ok, data = cv2.imencode(".jpg", scaled, [cv2.IMWRITE_JPEG_QUALITY, 80])
        else:
            ok, data = cv2.imencode(".png", scaled, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        text = base64.b64encode(data.tobytes()).decode() if ok else ""
        if ok and len(text) <= max_chars:
            return f"![{alt}](data:image/{'jpeg' if photo else 'png'};base64,{text})"
        width = int(width * 0.75)
    return None


def artifact_markdown(markdown: str, layout: RunLayout, rows: list[dict[str, Any]]) -> str:
    """report.md as the Prefect artifact shows it: each figure embedded (downscaled to an equal share of
    `ARTIFACT_IMAGE_BYTES`), or its absolute path and a text histogram when it cannot be embedded."""
    lines = markdown.splitlines()
    figures = sum(line.startswith("![") for line in lines)
    share = ARTIFACT_IMAGE_BYTES // max(1, figures)
    out = []
    for line in lines:
        if not line.startswith("!["):
            out.append(line)
            continue
        name, target = line[2:].split("](", 1)
        path = layout.out / target.rstrip(")")
        embedded = inline_figure(path, name, share, photo=name not in SCORE_COLUMNS)
        if embedded:
            out.append(embedded)
            continue
        out.append(f"- figure: `{path}`")
        if name in SCORE_COLUMNS:
            out += ["", text_histogram([r.get(name) for r in rows]), ""]
    return "\n".join(out) + "\n"


def write_report(out: str | Path, config: CurationConfig) -> str:
    """Write OUT/report.md (+ OUT/report/*.png); return the markdown for the Prefect artifact."""
    markdown, artifact = build_report(out, config)
    atomic_write(RunLayout(out).report, markdown)
    return artifact
