"""LVD -> LVD-F filtering: per-score rules applied after every clip of the run has been scored.

Percentile rules rank the run's clips (ties broken by clip id, so reruns agree) and drop exactly the
requested share at one end; absolute rules compare with a threshold. A clip without a score for a rule
(scorer not configured, or it failed on that clip) is not dropped by it, and a rule whose column has no
scores at all is reported as skipped, never guessed.

Near-duplicates (docs/dedup.md) come last: of each group found by `curation.dedup`, the clip that passes the
other rules and is best by `dedup.keep_best` is kept, and the others are dropped by the `duplicate` rule with
`duplicate_of` naming the kept clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from curation.config import CLIP_LENGTH, CLIP_PIXELS, DedupConfig, FilterRule

# Set at decode time on clips that hold a frame the decoder flagged corrupt (it concealed the damage and went
# on) or a frame of the same group of pictures (they predict from it). Such clips are never kept, whatever
# rules are configured, and do not count in the other rules' percentiles.
DECODE_ERRORS = "decode_errors"
DECODE_ERRORS_RULE = FilterRule(DECODE_ERRORS, "drop_reasons", "absolute", "high", 0.0)


@dataclass
class RuleOutcome:
    rule: FilterRule
    scored: int
    dropped: int
    threshold: float | None
    skipped: str | None = None


@dataclass
class FilterSummary:
    total: int
    kept: int
    outcomes: list[RuleOutcome] = field(default_factory=list)


DUPLICATE = "duplicate"


def duplicate_rule(config: DedupConfig, method: str) -> FilterRule:
    """The near-duplicate rule as the summary and the report list it (its value: the method's threshold)."""
    value = config.clip_min_cosine if method == "clip" else float(config.phash_max_bits)
    return FilterRule(DUPLICATE, "duplicate_of", "absolute", "low" if method == "clip" else "high", value)


def apply_filters(rows: list[dict[str, Any]], rules: list[FilterRule], duplicates: dict[str, str] | None = None,
                  dedup: DedupConfig | None = None, dedup_method: str | None = None) -> FilterSummary:
    """Set `keep`, `drop_reasons` and `duplicate_of` on every row in place; return counts per rule.
    `duplicates`: {clip_id: group} of the clips with near-duplicates (`curation.dedup.read_duplicate_groups`)."""
    for row in rows:
        row["drop_reasons"] = [reason for reason in row.get("drop_reasons") or [] if reason == DECODE_ERRORS]
    usable = [row for row in rows if not row["drop_reasons"]]
    outcomes = []
    for rule in rules:
        scored = [row for row in usable if _finite(row.get(rule.column))]
        if not scored:
            outcomes.append(RuleOutcome(rule, 0, 0, None, skipped=f"no {rule.column} scores in this run"))
            continue
        if rule.mode == "percentile":
            ranked = sorted(scored, key=lambda r: (r[rule.column], r["clip_id"]), reverse=rule.drop == "high")
            count = math.floor(len(ranked) * rule.value / 100.0)
            dropped = ranked[:count]
            threshold = dropped[-1][rule.column] if dropped else None
        else:
            if rule.drop == "low":
                dropped = [r for r in scored if r[rule.column] < rule.value]
            else:
                dropped = [r for r in scored if r[rule.column] > rule.value]
            threshold = rule.value
        for row in dropped:
            row["drop_reasons"].append(rule.name)
        outcomes.append(RuleOutcome(rule, len(scored), len(dropped), threshold))
    outcomes.append(RuleOutcome(DECODE_ERRORS_RULE, len(rows), len(rows) - len(usable), None))
    for row in rows:
        row["duplicate_of"] = None
    if dedup_method is not None:
        dedup = dedup or DedupConfig()
        in_groups, dropped = mark_duplicates(rows, duplicates or {}, dedup.keep_best)
        outcomes.append(RuleOutcome(duplicate_rule(dedup, dedup_method), in_groups, dropped, None))
    for row in rows:
        row["keep"] = not row["drop_reasons"]
    return FilterSummary(total=len(rows), kept=sum(row["keep"] for row in rows), outcomes=outcomes)


def mark_duplicates(rows: list[dict[str, Any]], groups: dict[str, str], keep_best: tuple[str, ...]) -> tuple[int, int]:
    """Keep one clip per group: the one the other rules keep, then the best by `keep_best` (a missing score counts
    as the worst), then the smallest clip id; the others get the `duplicate` reason and `duplicate_of`. Returns
    (clips in groups, clips dropped as duplicates)."""
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["clip_id"] in groups:
            members.setdefault(groups[row["clip_id"]], []).append(row)

    def rank(row: dict[str, Any]) -> tuple:
        scores = [_keep_score(row, name) for name in keep_best]
        return (bool(row["drop_reasons"]), *(-score for score in scores), row["clip_id"])

    dropped = 0
    for group in members.values():
        if len(group) < 2:
            continue  # its other members are not in this run's rows (a group is always of the committed clips)
        kept = min(group, key=rank)
        for row in group:
            if row is not kept:
                row["duplicate_of"] = kept["clip_id"]
                row["drop_reasons"].append(DUPLICATE)
                dropped += 1
    return sum(len(group) for group in members.values() if len(group) > 1), dropped


def _keep_score(row: dict[str, Any], name: str) -> float:
    if name == CLIP_LENGTH:
        value = (row.get("end_s") or 0.0) - (row.get("start_s") or 0.0)
    elif name == CLIP_PIXELS:
        value = (row.get("width") or 0) * (row.get("height") or 0)
    else:
        value = row.get(name)
    return float(value) if _finite(value) else -math.inf


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
