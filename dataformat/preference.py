"""The on-disk layout of a human preference study (`lvd study create / serve / results`).

    OUT/study.json           the study: systems, axes, how videos were paired, settings (`StudyManifest`);
                             written last at creation, so its presence means the study is complete
    OUT/pairs.json           every pair a rater sees (`StudyPair`): ids, sides, videos, gold answers
    OUT/videos/SYSTEM/N.webm each system's video of item N, transcoded to VP9 WebM (plays in every current browser)
    OUT/videos/gold/N.webm   the degraded copies of gold pairs
    OUT/votes.jsonl          the vote log: one JSON object per line (`VOTE_KEYS`), appended and fsynced as each
                             vote is cast, never rewritten; the last vote of a rater on a (pair, axis) counts
    OUT/results/             pairwise.parquet, scores.parquet, raters.parquet, agreement.parquet (schemas below),
                             results.json (everything, for `--json` and the flow) and results.png (the plot)
    OUT/.lvd-lock            the serving process (one writer of votes.jsonl at a time)

A kill can leave at most a partial last line in votes.jsonl (the vote being written, never acknowledged to the
rater); `read_vote_log` reports how many bytes are whole lines so the writer cuts the tail before appending.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa

from dataformat.atomic import fsync_directory

STUDY_FORMAT_VERSION = 1
VIDEO_SUFFIX = ".webm"
GOLD_DIR = "gold"
VOTE_KEYS = ("pair", "rater", "axis", "choice", "time")
CHOICES = ("left", "right", "none")


class StudyLayout:
    """Every path of a study under `out`."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)

    @property
    def study(self) -> Path:
        return self.root / "study.json"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.json"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    def video(self, system: str, item: int) -> Path:
        return self.videos / system / f"{item:04d}{VIDEO_SUFFIX}"

    def gold_video(self, index: int) -> Path:
        return self.videos / GOLD_DIR / f"{index:04d}{VIDEO_SUFFIX}"

    @property
    def votes(self) -> Path:
        return self.root / "votes.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def pairwise(self) -> Path:
        return self.results / "pairwise.parquet"

    @property
    def scores(self) -> Path:
        return self.results / "scores.parquet"

    @property
    def raters(self) -> Path:
        return self.results / "raters.parquet"

    @property
    def agreement(self) -> Path:
        return self.results / "agreement.parquet"

    @property
    def summary(self) -> Path:
        return self.results / "results.json"

    @property
    def plot(self) -> Path:
        return self.results / "results.png"


@dataclass(frozen=True)
class StudyPair:
    """One comparison. `left`/`right` are system names (a gold pair's degraded side is `GOLD_DIR`); the videos are
    paths relative to the study root; `gold` is the side of the untouched video in a gold pair, else None."""

    id: str
    item: str
    label: str
    left: str
    right: str
    left_video: str
    right_video: str
    gold: str | None = None


@dataclass(frozen=True)
class StudyManifest:
    """study.json: what was compared and how the videos were paired (`pairing`: "metadata" = the generation
    records beside the videos, "stem" = file names)."""

    systems: list[str]
    axes: list[str]
    pairing: str
    items: int
    seed: int
    sources: dict[str, str]
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    gold: int = 0
    codec: str = "vp9 webm"
    format_version: int = STUDY_FORMAT_VERSION


def _from_dict(cls: type, data: Any, where: Path) -> Any:
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(data, dict) or not required <= set(data):
        raise ValueError(f"{where}: not a study file (expected the keys {', '.join(sorted(names))})")
    return cls(**{key: value for key, value in data.items() if key in names})


def write_study(layout: StudyLayout, manifest: StudyManifest, pairs: list[StudyPair]) -> None:
    """pairs.json, then study.json (the marker of a complete study), each atomically."""
    from dataformat.atomic import atomic_write_json

    atomic_write_json(layout.pairs, [asdict(pair) for pair in pairs], indent=1)
    atomic_write_json(layout.study, asdict(manifest))


def read_study(layout: StudyLayout) -> tuple[StudyManifest, list[StudyPair]]:
    """The study's manifest and pairs; a missing or foreign study is a ValueError naming the file."""
    if not layout.study.is_file():
        raise ValueError(f"{layout.root}: not a study (no {layout.study.name}; create one with `lvd study create`)")
    try:
        manifest_data = json.loads(layout.study.read_text())
        pairs_data = json.loads(layout.pairs.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{layout.root}: unreadable study ({error})") from None
    manifest = _from_dict(StudyManifest, manifest_data, layout.study)
    if manifest.format_version != STUDY_FORMAT_VERSION:
        raise ValueError(f"{layout.study}: study format {manifest.format_version}, this version reads "
                         f"{STUDY_FORMAT_VERSION}")
    if not isinstance(pairs_data, list):
        raise ValueError(f"{layout.pairs}: expected a list of pairs")
    return manifest, [_from_dict(StudyPair, pair, layout.pairs) for pair in pairs_data]


# ------------------------------------------------------------------------------------------- the vote log


def encode_vote(vote: dict[str, Any]) -> bytes:
    """One log line: the keys of VOTE_KEYS in order, compact JSON, newline-terminated."""
    return (json.dumps({key: vote[key] for key in VOTE_KEYS}, separators=(",", ":")) + "\n").encode()


def read_vote_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(votes, bytes of whole lines). A partial last line (a write cut by a kill) is left out; any other line that
    is not a vote is a ValueError naming the line, since that is damage this program never writes."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    votes = []
    for number, line in enumerate(data[:whole].splitlines(), 1):
        try:
            vote = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            vote = None
        if not isinstance(vote, dict) or set(vote) != set(VOTE_KEYS):
            raise ValueError(f"{path}:{number}: not a vote line: {line[:80]!r}")
        votes.append(vote)
    return votes, whole


class VoteLog:
    """Append-only writer of votes.jsonl: each vote is one write of one line, fsynced before `append` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.votes, whole = read_vote_log(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._descriptor).st_size > whole:  # the unacknowledged vote a kill cut short
            os.ftruncate(self._descriptor, whole)
            os.fsync(self._descriptor)
        if new:
            fsync_directory(self.path.parent)

    def append(self, vote: dict[str, Any]) -> None:
        line = encode_vote(vote)
        written = os.write(self._descriptor, line)
        if written != len(line):
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._descriptor)
        self.votes.append({key: vote[key] for key in VOTE_KEYS})

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1


# ----------------------------------------------------------------------------------------------- results

PAIRWISE_SCHEMA = pa.schema([
    ("axis", pa.string()), ("system_a", pa.string()), ("system_b", pa.string()), ("votes", pa.int64()),
    ("wins_a", pa.int64()), ("wins_b", pa.int64()), ("ties", pa.int64()), ("win_rate", pa.float64()),
    ("low", pa.float64()), ("high", pa.float64()),
])
SCORES_SCHEMA = pa.schema([
    ("axis", pa.string()), ("system", pa.string()), ("score", pa.float64()), ("low", pa.float64()),
    ("high", pa.float64()), ("votes", pa.int64()),
])
RATERS_SCHEMA = pa.schema([
    ("rater", pa.string()), ("votes", pa.int64()), ("gold_votes", pa.int64()), ("gold_correct", pa.int64()),
    ("gold_accuracy", pa.float64()), ("kept", pa.bool_()),
])
AGREEMENT_SCHEMA = pa.schema([
    ("axis", pa.string()), ("alpha", pa.float64()), ("units", pa.int64()), ("ratings", pa.int64()),
    ("raters", pa.int64()),
])
