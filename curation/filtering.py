"""LVD -> LVD-F filtering: per-score rules applied after every clip of the run has been scored.

Percentile rules rank the run's clips (ties broken by clip id, so reruns agree) and drop exactly the
requested share at one end; absolute rules compare with a threshold. A clip without a score for a rule
(scorer not configured, or it failed on that clip) is not dropped by it, and a rule whose column has no
scores at all is reported as skipped, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from curation.config import FilterRule

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


def apply_filters(rows: list[dict[str, Any]], rules: list[FilterRule]) -> FilterSummary:
    """Set `keep` and `drop_reasons` on every row in place; return counts per rule."""
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
        row["keep"] = not row["drop_reasons"]
    return FilterSummary(total=len(rows), kept=sum(row["keep"] for row in rows), outcomes=outcomes)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
