"""The results of a study from its vote log: per axis, pairwise win rates, Bradley-Terry scores, agreement, and
each rater's gold-pair accuracy; written as Parquet, JSON and a plot (`dataformat.preference` for the files).

What counts: the last vote of each rater on each (pair, axis); gold pairs only screen raters (they never count
for a system); with `min_gold_accuracy`, raters whose gold accuracy is below it are dropped from everything else
(raters who saw no gold pair stay). On a gold pair the right answer on every axis is the untouched video: "no
preference" counts as wrong, since the degraded copy is worse in every respect.

Per axis and pair of systems (A, B in the study's order): votes, A's wins, B's wins, ties, A's win rate (a tie
counts half) with its Wilson interval. With three or more systems also the Bradley-Terry log-strength of each
system with a bootstrap percentile interval over votes or, with `bootstrap_unit` "rater", over raters
(`evaluation.preference.stats`). Agreement: Krippendorff's alpha over
the pairs that two or more raters judged, the choices (left / right / none) as nominal values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from dataformat import atomic_write, atomic_write_json, write_parquet_atomic
from dataformat.preference import (
    AGREEMENT_SCHEMA,
    PAIRWISE_SCHEMA,
    RATERS_SCHEMA,
    SCORES_SCHEMA,
    StudyLayout,
    StudyManifest,
    StudyPair,
    read_study,
    read_vote_log,
)
from evaluation.preference.request import StudyResultsRequest
from evaluation.preference.stats import bootstrap_bradley_terry, krippendorff_alpha_nominal, wilson_interval
from evaluation.preference.store import latest_votes

OUTCOME = {"left": 1.0, "right": 0.0, "none": 0.5}  # for the left side's system


def rater_rows(pairs: dict[str, StudyPair], latest: dict[tuple[str, str, str], str],
               min_gold_accuracy: float | None) -> list[dict[str, Any]]:
    """One row per rater: votes, gold votes, gold correct, gold accuracy (None without gold votes), kept."""
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for (rater, pair_id, _), choice in latest.items():
        tally = tallies[rater]
        tally[0] += 1
        gold = pairs[pair_id].gold
        if gold is not None:
            tally[1] += 1
            tally[2] += choice == gold
    rows = []
    for rater in sorted(tallies):
        votes, gold_votes, correct = tallies[rater]
        accuracy = correct / gold_votes if gold_votes else None
        kept = min_gold_accuracy is None or accuracy is None or accuracy >= min_gold_accuracy
        rows.append({"rater": rater, "votes": votes, "gold_votes": gold_votes, "gold_correct": correct,
                     "gold_accuracy": accuracy, "kept": kept})
    return rows


def axis_results(manifest: StudyManifest, pairs: dict[str, StudyPair], latest: dict[tuple[str, str, str], str],
                 axis: str, request: StudyResultsRequest) -> dict[str, Any]:
    """Pairwise rows, Bradley-Terry rows (three or more systems) and agreement of one axis (kept raters only)."""
    index = {system: position for position, system in enumerate(manifest.systems)}
    a, b, outcome, raters = [], [], [], []
    units: dict[str, list[str]] = defaultdict(list)
    for (rater, pair_id, vote_axis), choice in latest.items():
        pair = pairs[pair_id]
        if vote_axis != axis or pair.gold is not None:
            continue
        raters.append(rater)
        a.append(index[pair.left])
        b.append(index[pair.right])
        outcome.append(OUTCOME[choice])
        units[pair_id].append(choice)
    a_array, b_array, outcome_array = np.array(a, int), np.array(b, int), np.array(outcome, float)
    pairwise = []
    for first in range(len(manifest.systems)):
        for second in range(first + 1, len(manifest.systems)):
            forward = (a_array == first) & (b_array == second)
            backward = (a_array == second) & (b_array == first)
            result = np.concatenate([outcome_array[forward], 1.0 - outcome_array[backward]])
            votes = len(result)
            wins_a, wins_b = int(np.sum(result == 1.0)), int(np.sum(result == 0.0))
            ties = votes - wins_a - wins_b
            low, high = wilson_interval(wins_a + ties / 2, votes, request.confidence)
            pairwise.append({"axis": axis, "system_a": manifest.systems[first], "system_b": manifest.systems[second],
                             "votes": votes, "wins_a": wins_a, "wins_b": wins_b, "ties": ties,
                             "win_rate": (wins_a + ties / 2) / votes if votes else None,
                             "low": low if votes else None, "high": high if votes else None})
    scores = []
    if len(manifest.systems) > 2:
        fitted, low, high = bootstrap_bradley_terry(a_array, b_array, outcome_array, len(manifest.systems),
                                                    rounds=request.bootstrap_rounds, confidence=request.confidence,
                                                    seed=request.bootstrap_seed,
                                                    groups=np.array(raters) if request.bootstrap_unit == "rater"
                                                    else None)
        counts = np.bincount(np.concatenate([a_array, b_array]), minlength=len(manifest.systems))
        scores = [{"axis": axis, "system": system, "score": float(fitted[i]), "low": float(low[i]),
                   "high": float(high[i]), "votes": int(counts[i])} for i, system in enumerate(manifest.systems)]
    alpha = krippendorff_alpha_nominal(list(units.values()))
    rated_twice = [ratings for ratings in units.values() if len(ratings) >= 2]
    agreement = {"axis": axis, "alpha": None if math.isnan(alpha) else alpha, "units": len(rated_twice),
                 "ratings": sum(map(len, rated_twice)),
                 "raters": len({rater for rater, pair_id, vote_axis in latest
                                if vote_axis == axis and pairs[pair_id].gold is None})}
    return {"pairs": pairwise, "scores": scores, "agreement": agreement}


def compute_results(request: StudyResultsRequest) -> dict[str, Any]:
    """The results of the votes cast so far (module docstring), written under OUT/results/; returns the summary."""
    layout = request.layout
    manifest, pair_list = read_study(layout)
    pairs = {pair.id: pair for pair in pair_list}
    votes, _ = read_vote_log(layout.votes)
    latest = {key: choice for key, choice in latest_votes(votes).items() if key[1] in pairs}
    raters = rater_rows(pairs, latest, request.min_gold_accuracy)
    kept = {row["rater"] for row in raters if row["kept"]}
    counted = {key: choice for key, choice in latest.items() if key[0] in kept}
    by_axis = {axis: axis_results(manifest, pairs, counted, axis, request) for axis in manifest.axes}
    summary = {
        "study": str(layout.root), "systems": manifest.systems, "axes": manifest.axes, "pairing": manifest.pairing,
        "confidence": request.confidence, "min_gold_accuracy": request.min_gold_accuracy,
        "votes": sum(1 for key in counted if pairs[key[1]].gold is None),
        "raters": raters, "dropped_raters": sorted(row["rater"] for row in raters if not row["kept"]),
        "by_axis": {axis: {**result, "pairs": [{**row, "interval": [row["low"], row["high"]]}
                                               for row in result["pairs"]]}
                    for axis, result in by_axis.items()},
    }
    write_results(layout, summary, by_axis)
    return summary


def write_results(layout: StudyLayout, summary: dict[str, Any], by_axis: dict[str, dict[str, Any]]) -> None:
    results = list(by_axis.values())
    write_parquet_atomic([row for result in results for row in result["pairs"]], PAIRWISE_SCHEMA, layout.pairwise)
    write_parquet_atomic([row for result in results for row in result["scores"]], SCORES_SCHEMA, layout.scores)
    write_parquet_atomic([result["agreement"] for result in results], AGREEMENT_SCHEMA, layout.agreement)
    write_parquet_atomic(summary["raters"], RATERS_SCHEMA, layout.raters)
    atomic_write(layout.plot, lambda handle: plot_results(summary, handle))
    atomic_write_json(layout.summary, summary)


def plot_results(summary: dict[str, Any], handle: Any) -> None:
    """One column per axis: the first system's win rate against each other system with its interval, and with
    three or more systems the Bradley-Terry scores below; written as PNG to `handle`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = summary["axes"]
    with_scores = len(summary["systems"]) > 2
    rows = 2 if with_scores else 1
    pair_count = len(summary["by_axis"][axes_names[0]]["pairs"])
    figure, grid = plt.subplots(rows, len(axes_names), squeeze=False,
                                figsize=(3.6 * len(axes_names) + 1.5, (0.45 * pair_count + 1.4) * rows + 0.4))
    for column, axis in enumerate(axes_names):
        result = summary["by_axis"][axis]
        plot = grid[0][column]
        labels = [f"{row['system_a']} vs {row['system_b']} (n={row['votes']})" for row in result["pairs"]]
        rates = [row["win_rate"] if row["win_rate"] is not None else math.nan for row in result["pairs"]]
        lows = [rate - row["low"] if row["votes"] else 0 for rate, row in zip(rates, result["pairs"], strict=True)]
        highs = [row["high"] - rate if row["votes"] else 0 for rate, row in zip(rates, result["pairs"], strict=True)]
        positions = np.arange(len(labels))
        plot.barh(positions, rates, xerr=[lows, highs], color="#5b8def", capsize=3)
        plot.axvline(0.5, color="#888", linestyle="--", linewidth=1)
        plot.set_xlim(0, 1)
        plot.set_yticks(positions, labels if column == 0 else [""] * len(labels))
        plot.invert_yaxis()
        plot.set_title(f"{axis}: first system's win rate", fontsize=9)
        if with_scores:
            plot = grid[1][column]
            scores = result["scores"]
            values = [row["score"] for row in scores]
            plot.barh(np.arange(len(scores)), values, color="#f0b429",
                      xerr=[[v - row["low"] for v, row in zip(values, scores, strict=True)],
                            [row["high"] - v for v, row in zip(values, scores, strict=True)]], capsize=3)
            plot.axvline(0, color="#888", linewidth=1)
            plot.set_yticks(np.arange(len(scores)), [row["system"] for row in scores] if column == 0
                            else [""] * len(scores))
            plot.invert_yaxis()
            plot.set_title(f"{axis}: Bradley-Terry log-strength", fontsize=9)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=90)
    plt.close(figure)
