"""Near-duplicate removal: planted copies of real footage found, distinct shots kept apart, the index agreeing with an
exhaustive comparison, resuming, and the settings' checks."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from common.requests import RequestError
from curation.config import CurationConfig
from curation.dataset import finalize, prepare_output, run_sequential
from curation.dedup import connect, find_duplicates, find_roots, group_vectors, read_duplicate_groups
from curation.report import write_report
from dataformat import LOCK_NAME, Column, RunLayout, read_parquet_rows
from tests.dedup_helpers import COPIES, ORIGINALS, write_planted_set


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted set curated in-process (no learned scorers: the perceptual-hash signature)."""
    root = tmp_path_factory.mktemp("planted")
    truth = write_planted_set(root / "videos")
    summary = run_sequential(root / "videos", root / "out")
    rows = read_parquet_rows(RunLayout(root / "out").manifest)
    return root / "out", truth, summary, rows


def _group_of(out, rows) -> dict[str, str]:
    """source file -> its clip's group (the clip itself when it has no duplicates); one clip per source here."""
    groups = read_duplicate_groups(out)
    return {row[Column.SOURCE]: groups.get(row[Column.CLIP_ID], row[Column.CLIP_ID]) for row in rows}


def test_planted_copies_are_found_and_different_shots_never_merged(planted):
    out, truth, summary, rows = planted
    assert len(rows) == len(truth)  # one clip per source: every copy is a whole shot
    group = _group_of(out, rows)
    copies = [(source, original) for source, original in truth.items() if source != f"{original}.mp4"]
    found = [source for source, original in copies if group[source] == group[f"{original}.mp4"]]
    recall = len(found) / len(copies)
    originals = [f"{name}.mp4" for name in ORIGINALS]
    false_merges = [(a, b) for a, b in itertools.combinations(originals, 2) if group[a] == group[b]]
    # distinct shots include two stretches of one continuous shot and two moments of one talking head
    assert recall >= 0.9, f"recall {recall:.2f}; missed: {sorted(set(s for s, _ in copies) - set(found))}"
    assert false_merges == [], f"distinct shots merged: {false_merges}"
    assert len(copies) == len(ORIGINALS) * len(COPIES)
    assert summary["duplicates"]["method"] == "phash"
    assert summary["duplicates"]["groups"] == len(set(read_duplicate_groups(out).values()))


def test_one_clip_kept_per_group_and_the_others_name_it(planted):
    out, _, summary, rows = planted
    groups = read_duplicate_groups(out)
    by_id = {row[Column.CLIP_ID]: row for row in rows}
    members: dict[str, list[dict]] = {}
    for clip_id, group in groups.items():
        members.setdefault(group, []).append(by_id[clip_id])
    for group_rows in members.values():
        kept = [row for row in group_rows if row[Column.DUPLICATE_OF] is None]
        assert len(kept) == 1
        for row in group_rows:
            if row is not kept[0]:
                assert row[Column.DUPLICATE_OF] == kept[0][Column.CLIP_ID]
                assert "duplicate" in row[Column.DROP_REASONS] and not row[Column.KEEP]
        # the kept clip passes every other rule when a member does, and has the most pixels among those that do
        passing = [row for row in group_rows if set(row[Column.DROP_REASONS]) <= {"duplicate"}]
        if passing:
            assert kept[0] in passing
            assert kept[0]["width"] * kept[0]["height"] == max(r["width"] * r["height"] for r in passing)
    rule = next(rule for rule in summary["rules"] if rule["name"] == "duplicate")
    dropped = sum(row[Column.DUPLICATE_OF] is not None for row in rows)
    assert rule["dropped"] == dropped == summary["duplicates"]["duplicates"] == len(groups) - len(members)
    assert all(row[Column.DUPLICATE_OF] is None for row in rows if row[Column.CLIP_ID] not in groups)


def test_report_shows_the_groups(planted):
    out, _, summary, _ = planted
    write_report(out, CurationConfig())
    markdown = RunLayout(out).report.read_text()
    section = markdown.split("## Near-duplicates", 1)[1].split("\n## ", 1)[0]
    assert f"groups: **{summary['duplicates']['groups']}**" in section
    assert f"removed as duplicates: **{summary['duplicates']['duplicates']}**" in section
    assert (RunLayout(out).report_figures / "duplicate_groups.png").is_file()
    assert "| duplicate | duplicate_of | near-duplicate (phash, 28) |" in markdown


def test_rerun_reuses_the_groups_and_new_settings_recompute_them(planted, tmp_path):
    out, *_ = planted
    again = find_duplicates(out, CurationConfig())
    assert again["reused"] and again["groups"] == json.loads(RunLayout(out).dedup_state.read_text())["groups"]
    # a copy of the run with no tolerance left: only identical hashes (the rescaled copies') still group
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(LOCK_NAME))
    strict = CurationConfig.from_overrides({"dedup": {"phash_max_bits": 0}})
    summary = finalize(prepare_output(copy, strict), strict)
    assert not summary["duplicates"]["reused"]
    assert summary["duplicates"]["in_groups"] < again["in_groups"]
    off = CurationConfig.from_overrides({"dedup": {"enabled": False}})
    summary = finalize(prepare_output(copy, off), off)
    assert summary["duplicates"] == {"method": None} and "duplicate" not in [r["name"] for r in summary["rules"]]
    assert not RunLayout(copy).duplicate_groups.exists()


def _exact_components(vectors: np.ndarray, min_cosine: float) -> np.ndarray:
    """Reference: every pair compared, then the smallest index of each component."""
    parent = list(range(len(vectors)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(vectors @ vectors.T >= min_cosine, k=1)), strict=True):
        a, b = root(int(i)), root(int(j))
        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(vectors))])


def test_the_index_finds_what_an_exhaustive_comparison_finds():
    """3000 clustered unit vectors (64-d) with planted near-copies: the k-means cells (cell size 128, so ~24 cells)
    link exactly the pairs that comparing every pair links."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 64))
    points = centres[rng.integers(0, 20, 2500)] + 0.6 * rng.normal(size=(2500, 64))
    copies = points[:500] + 0.05 * rng.normal(size=(500, 64))
    vectors = np.concatenate([points, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    roots, stats = group_vectors(len(vectors), lambda rows: vectors[rows], 0.97, cell_size=128, probes=2)
    expected = _exact_components(vectors, 0.97)
    assert stats.cells > 10 and stats.compared_pairs < len(vectors) ** 2 / 4  # the index, not all pairs
    planted_found = np.mean(roots[:500] == roots[2500:])
    assert planted_found >= 0.99
    assert np.array_equal(roots, expected) or np.mean(roots == expected) >= 0.995


def test_connect_matches_a_plain_union_find():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 500, 400), rng.integers(0, 500, 400)
    parent = np.arange(500)
    connect(parent, a, b)
    reference = list(range(500))

    def root(i: int) -> int:
        while reference[i] != i:
            i = reference[i]
        return i

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = root(x), root(y)
        reference[max(rx, ry)] = min(rx, ry)
    assert find_roots(parent, np.arange(500)).tolist() == [root(i) for i in range(500)]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"probes": 0}, "setting dedup.probes must be >= 1, got 0"),
    ({"clip_min_cosine": 1.5}, "setting dedup.clip_min_cosine must be <= 1.0, got 1.5"),
    ({"method": "minhash"}, "setting dedup.method must be one of auto, clip, phash, got 'minhash'"),
    ({"keep_best": ["sharpness"]}, "setting dedup.keep_best must be one of motion_score, text_area, "),
    ({"method": "clip"}, "setting dedup.method='clip' needs the CLIP scorer, which is off: no weights configured"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(RequestError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        CurationConfig.from_overrides({"dedup": overrides})
