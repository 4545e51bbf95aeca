"""The statistics of a pairwise preference study: plain functions on arrays of comparisons.

A comparison is (a, b, outcome): system indices and 1.0 when a won, 0.0 when b won, 0.5 for "no preference".
Ties count as half a win for each side throughout (the convention of Chatbot Arena / GenAI-Arena's Bradley-Terry
fits), not Davidson's tie model: a rater's "no preference" moves a score towards the other's, as it should, and
needs no extra parameter.

* `wilson_interval`: the score interval of a binomial proportion (Wilson 1927), right at 0 % and 100 % and for
  a handful of votes, where the normal approximation gives intervals outside [0, 1].
* `bradley_terry`: P(i beats j) = p_i / (p_i + p_j), the maximum-likelihood fit by Newton's method (the MM
  iteration of Zermelo / Hunter 2004 gives the same optimum, slower), with `prior` virtual tied comparisons per
  pair of systems so a system that never won still gets a finite score.
  Scores are log-strengths centred on their mean: a difference d means P(win) = 1 / (1 + exp(-d)).
* `bootstrap_bradley_terry`: percentile intervals of those scores over votes (or raters) resampled with
  replacement.
* `krippendorff_alpha_nominal`: agreement between raters beyond chance (1 = perfect, 0 = chance, < 0 = worse),
  from the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"); any number of
  raters per unit, missing ratings allowed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (0.95 -> 1.959964)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of `successes` out of `trials` (a tie counts half a success); (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def win_matrix(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, systems: int) -> np.ndarray:
    """wins[i, j]: how often i beat j (ties half a win each way)."""
    wins = np.zeros((systems, systems))
    np.add.at(wins, (a, b), outcome)
    np.add.at(wins, (b, a), 1.0 - outcome)
    return wins


def bradley_terry_from_wins(wins: np.ndarray, prior: float = 1.0, tolerance: float = 1e-10,
                            max_iterations: int = 100) -> np.ndarray:
    """Mean-centred log-strengths maximising the Bradley-Terry likelihood of a win matrix.

    Newton's method on the log-strengths (the first fixed at 0: the likelihood only sees differences), halving
    steps that would lower the likelihood; the likelihood is concave, so it converges in a handful of steps
    where Zermelo's / Hunter's MM iteration, p_i <- W_i / sum_j n_ij / (p_i + p_j), needs hundreds.
    `prior` adds that many tied comparisons between every two systems (half a win each way)."""
    systems = wins.shape[0]
    wins = wins + (prior / 2) * (1 - np.eye(systems))
    games = wins + wins.T
    total_wins = wins.sum(axis=1)

    def log_likelihood(theta: np.ndarray) -> float:
        difference = theta[:, None] - theta[None, :]
        return float(np.sum(wins * -np.logaddexp(0.0, -difference)))

    theta = np.zeros(systems)
    current = log_likelihood(theta)
    for _ in range(max_iterations):
        p_win = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))
        gradient = total_wins - (games * p_win).sum(axis=1)
        curvature = games * p_win * (1.0 - p_win)
        hessian = curvature - np.diag(curvature.sum(axis=1))
        step = np.zeros(systems)
        step[1:] = np.linalg.solve(hessian[1:, 1:], -gradient[1:])
        scale = 1.0
        while True:
            candidate = theta + scale * step
            value = log_likelihood(candidate)
            if value >= current - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, current = candidate, value
        if np.max(np.abs(scale * step)) < tolerance:
            break
    return theta - theta.mean()


def bradley_terry(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, systems: int, prior: float = 1.0) -> np.ndarray:
    """Mean-centred Bradley-Terry log-strengths of `systems` systems from comparisons (see the module docstring)."""
    return bradley_terry_from_wins(win_matrix(np.asarray(a), np.asarray(b), np.asarray(outcome, float), systems),
                                   prior)


def bootstrap_bradley_terry(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, systems: int, *, rounds: int = 1000,
                            confidence: float = 0.95, prior: float = 1.0, seed: int = 0,
                            groups: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(scores, low, high): the fit on all votes and the percentile interval over `rounds` resamples.

    Without `groups` the votes are resampled one by one; with `groups` (e.g. each vote's rater) whole groups
    are, so votes that move together (one rater's taste) widen the interval as they should."""
    a, b, outcome = np.asarray(a), np.asarray(b), np.asarray(outcome, float)
    scores = bradley_terry(a, b, outcome, systems, prior)
    if len(a) == 0:
        return scores, scores.copy(), scores.copy()
    rng = np.random.default_rng(seed)
    members = [np.arange(len(a))] if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    samples = np.empty((rounds, systems))
    for round_index in range(rounds):
        if groups is None:
            chosen = rng.integers(0, len(a), len(a))
        else:
            chosen = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        samples[round_index] = bradley_terry(a[chosen], b[chosen], outcome[chosen], systems, prior)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return scores, low, high


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float:
    """Krippendorff's alpha for nominal values; `units` holds each unit's ratings (one per rater who rated it).

    Units with fewer than two ratings carry no information on agreement and are left out. NaN when there is
    nothing to compare or every rating has the same value (agreement beyond chance is then undefined)."""
    coincidences: Counter = Counter()
    for ratings in units:
        count = len(ratings)
        if count < 2:
            continue
        values = Counter(ratings)
        for first, first_count in values.items():
            for second, second_count in values.items():
                pairs = first_count * (second_count - (first == second))
                coincidences[first, second] += pairs / (count - 1)
    totals: Counter = Counter()
    for (first, _), weight in coincidences.items():
        totals[first] += weight
    pairable = sum(totals.values())
    if pairable <= 1:
        return math.nan
    observed = sum(weight for (first, second), weight in coincidences.items() if first != second)
    expected = sum(totals[first] * totals[second] for first in totals for second in totals if first != second)
    if expected == 0:
        return math.nan
    return 1.0 - (pairable - 1) * observed / expected
