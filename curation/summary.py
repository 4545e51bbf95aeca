"""Human-readable summary of a curation run (Prefect markdown artifact and console)."""

from __future__ import annotations

import math
from typing import Any

SCORE_COLUMNS = ("motion_score", "text_area", "aesthetic_score", "clip_score")


def text_histogram(values: list[float], bins: int = 8, width: int = 24) -> str:
    """A fixed-width histogram that renders in any markdown viewer (the Prefect UI included)."""
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
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


def summary_markdown(report: dict[str, Any], manifest_rows: list[dict[str, Any]]) -> str:
    lines = [
        "# curate-lvd run",
        "",
        f"- sources: **{report['sources']}** ({report['sources_ok']} ok, {report['sources_error']} errors)",
        f"- clips: **{report['clips']}**, kept: **{report['kept']}**"
        + (f" ({report['kept'] / report['clips']:.0%})" if report["clips"] else ""),
        f"- clip files: {report['clip_methods'].get('copy', 0)} stream-copied, "
        f"{report['clip_methods'].get('reencode', 0)} re-encoded",
        f"- shards: {', '.join(report['shards']) or 'none'}",
        "",
        "## Filter rules",
        "",
        "| rule | column | mode | value | scored | dropped | threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in report["rules"]:
        threshold = "-" if rule["threshold"] is None else f"{rule['threshold']:.4g}"
        dropped = rule["skipped"] if rule["skipped"] else str(rule["dropped"])
        lines.append(
            f"| {rule['name']} | {rule['column']} | {rule['mode']} ({rule['drop']}) | {rule['value']} "
            f"| {rule['scored']} | {dropped} | {threshold} |"
        )
    if report["errors"]:
        lines += ["", "## Sources with errors", "", "| source | error |", "|---|---|"]
        lines += [f"| {source} | {error} |" for source, error in sorted(report["errors"].items())]
    lines += ["", "## Score histograms"]
    for column in SCORE_COLUMNS:
        lines += ["", f"**{column}**", "", text_histogram([row.get(column) for row in manifest_rows])]
    return "\n".join(lines) + "\n"
