"""The votes of a study: checked, appended to the log durably as they are cast, and each rater's place in it.

`VoteStore` is what the server holds: `cast` checks a vote against the study (a bad one is a `VoteError` with a
one-line message and changes nothing), appends it to votes.jsonl with an fsync before it returns, and updates
the in-memory tallies. A restarted server reads the log back, so every rater continues where they were.

Each rater sees every pair once, in an order of their own drawn from (study seed, rater id): different raters see
different pairs first (so a study stopped early still covers every pair), and the same rater always gets the same
order back. A pair is done for a rater once they have a vote on every axis; a second vote on the same (pair,
axis) replaces the first (the page lets a rater change their mind before moving on).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from dataformat.preference import CHOICES, StudyLayout, StudyManifest, StudyPair, VoteLog, read_study, read_vote_log
from evaluation.preference.request import PreferenceFlowRequest

RATER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
VOTE_FIELDS = ("pair", "rater", "axis", "choice")


class VoteError(ValueError):
    """A vote the study cannot take; the message is one line naming what is wrong."""


def check_rater(rater: Any) -> str:
    if not isinstance(rater, str) or not RATER_PATTERN.fullmatch(rater):
        raise VoteError(f"rater must be 1-64 letters, digits, '_', '.', '@' or '-', got {rater!r}")
    return rater


def rater_order(pairs: list[StudyPair], seed: int, rater: str) -> list[str]:
    """The pair ids in the order `rater` sees them (the same for the same rater, different between raters)."""
    ids = [pair.id for pair in pairs]
    random.Random(f"order:{seed}:{rater}").shuffle(ids)
    return ids


def media_url(pair_id: str, side: str) -> str:
    """Where the page fetches a side's video: by pair and side only, so nothing in it names the system."""
    return f"/media/{pair_id}/{side}"


def latest_votes(votes: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """{(rater, pair, axis): choice}, the last vote of each rater on each pair and axis."""
    return {(vote["rater"], vote["pair"], vote["axis"]): vote["choice"] for vote in votes}


def completed_raters(manifest: StudyManifest, pairs: list[StudyPair], votes: list[dict[str, Any]]) -> dict[str, int]:
    """{pair id: raters with a vote on every axis of it}."""
    axes_voted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rater, pair, axis in latest_votes(votes):
        axes_voted[rater, pair].add(axis)
    done = {pair.id: 0 for pair in pairs}
    for (_, pair), axes in axes_voted.items():
        if pair in done and axes >= set(manifest.axes):
            done[pair] += 1
    return done


def count_complete(layout: StudyLayout) -> dict[str, int]:
    """`completed_raters` of the study as its log stands now (readable while a server appends to it)."""
    manifest, pairs = read_study(layout)
    votes, _ = read_vote_log(layout.votes)
    return completed_raters(manifest, pairs, votes)


class VoteStore:
    """The study's votes for the server (module docstring). Thread-safe: the HTTP server answers in threads."""

    def __init__(self, layout: StudyLayout) -> None:
        self.layout = layout
        self.manifest, self.pairs = read_study(layout)
        self.pair_by_id = {pair.id: pair for pair in self.pairs}
        self._lock = threading.Lock()
        self._log = VoteLog(layout.votes)
        self._choices: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (rater, pair) -> {axis: choice}
        for (rater, pair, axis), choice in latest_votes(self._log.votes).items():
            self._choices[rater, pair][axis] = choice

    def close(self) -> None:
        with self._lock:
            self._log.close()

    def check(self, vote: Any) -> dict[str, Any]:
        """The vote as stored (with its time), or a VoteError naming the first problem."""
        if not isinstance(vote, dict):
            raise VoteError(f"a vote is a JSON object with {', '.join(VOTE_FIELDS)}")
        unknown = sorted(set(vote) - set(VOTE_FIELDS))
        missing = [name for name in VOTE_FIELDS if name not in vote]
        if unknown or missing:
            raise VoteError(f"a vote has exactly the fields {', '.join(VOTE_FIELDS)}"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                            + (f"; missing: {', '.join(missing)}" if missing else ""))
        if not isinstance(vote["pair"], str) or vote["pair"] not in self.pair_by_id:
            raise VoteError(f"no pair {vote['pair']!r} in this study")
        check_rater(vote["rater"])
        if vote["axis"] not in self.manifest.axes:
            raise VoteError(f"axis must be one of {', '.join(self.manifest.axes)}, got {vote['axis']!r}")
        if vote["choice"] not in CHOICES:
            raise VoteError(f"choice must be one of {', '.join(CHOICES)}, got {vote['choice']!r}")
        return {**{name: vote[name] for name in VOTE_FIELDS}, "time": round(time.time(), 3)}

    def cast(self, vote: Any) -> dict[str, Any]:
        """Check and store one vote durably; returns the rater's progress."""
        stored = self.check(vote)
        with self._lock:
            self._log.append(stored)
            self._choices[stored["rater"], stored["pair"]][stored["axis"]] = stored["choice"]
            return self._progress(stored["rater"])

    def next_pair(self, rater: str) -> dict[str, Any]:
        """The first pair in `rater`'s order without a vote on every axis, with the votes already cast on it."""
        check_rater(rater)
        with self._lock:
            progress = self._progress(rater)
            for pair_id in rater_order(self.pairs, self.manifest.seed, rater):
                voted = self._choices.get((rater, pair_id), {})
                if not set(self.manifest.axes) <= set(voted):
                    pair = self.pair_by_id[pair_id]
                    return {"done": False, "pair": pair.id, "label": pair.label, "left": media_url(pair.id, "left"),
                            "right": media_url(pair.id, "right"), "axes": self.manifest.axes, "voted": dict(voted),
                            "progress": progress}
        return {"done": True, "axes": self.manifest.axes, "progress": progress}

    def _progress(self, rater: str) -> dict[str, int]:
        axes = set(self.manifest.axes)
        done = sum(1 for pair in self.pairs if axes <= set(self._choices.get((rater, pair.id), {})))
        return {"done": done, "total": len(self.pairs)}


def wait_for_votes(request: PreferenceFlowRequest, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Count the votes every `request.poll_seconds` until every pair other than gold ones has been judged on every
    axis by `request.votes_per_pair` raters, or `request.max_wait_minutes` have passed. `on_progress(ready,
    total)` hears each change. Returns {"complete", "ready_pairs", "pairs", "waited_s"}."""
    started = time.monotonic()
    _, pairs = read_study(request.layout)
    counted = [pair.id for pair in pairs if pair.gold is None]
    last = -1
    while True:
        complete = count_complete(request.layout)
        ready = sum(1 for pair_id in counted if complete[pair_id] >= request.votes_per_pair)
        if ready != last and on_progress is not None:
            on_progress(ready, len(counted))
        last = ready
        waited = time.monotonic() - started
        if ready == len(counted) or waited >= request.max_wait_minutes * 60:
            return {"complete": ready == len(counted), "ready_pairs": ready, "pairs": len(counted),
                    "waited_s": round(waited, 1)}
        time.sleep(request.poll_seconds)
