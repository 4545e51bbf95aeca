"""The LVD-F report on a real (sequential, in-process) curation run of sample footage."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest

from curation import report as report_module
from curation.annotations import annotate_sources, read_annotations
from curation.config import CurationConfig
from curation.dataset import curate_source, finalize, prepare_output
from curation.dedup import read_duplicate_groups
from curation.hq import hq_pass
from curation.report import ARTIFACT_IMAGE_BYTES, ARTIFACT_MAX_WIDTH, build_report, rule_overlap, write_report
from dataformat import RunLayout, read_parquet_rows
from tests.scorer_helpers import tiny_models, tiny_scorer_overrides

SOURCES = ("bikes.mp4", "text_big.mp4", "text_small.mp4", "static_shot.mp4", "dissolves.mp4", "empty.mp4")


@pytest.fixture(scope="module")
def run(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-run")
    config = CurationConfig.from_overrides({"scorers": {**tiny_scorer_overrides(tiny_models()), "use_ray": False}})
    layout = prepare_output(out, config)
    for name in SOURCES:
        curate_source(sample_dir / "videos", name, out, config)
    scoring = annotate_sources(out, config)
    summary = finalize(layout, config, read_annotations(out))
    hq = hq_pass(out, config)
    artifact = write_report(out, config)
    return out, config, summary, hq, artifact, scoring


def _table_rows(markdown: str, header: str) -> list[list[str]]:
    section = markdown.split(header, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| rule")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_report_counts_match_the_run(run):
    out, _config, summary, _hq, _artifact, _scoring = run
    markdown = (out / "report.md").read_text()
    kept, total = summary["kept"], summary["clips"]
    assert f"kept: **{kept}** ({kept / total:.1%} kept)" in markdown
    table = _table_rows(markdown, "## What each rule removed")
    assert [row[0] for row in table] == [rule["name"] for rule in summary["rules"]]
    rows = read_parquet_rows(out / "manifest.parquet")
    for cells, rule in zip(table, summary["rules"], strict=True):
        assert cells[5] == str(rule["dropped"])
        alone = sum(list(r["drop_reasons"]) == [rule["name"]] for r in rows)
        assert cells[6] == str(alone) and alone <= rule["dropped"]


def test_overlap_table_is_symmetric_with_per_rule_counts_on_the_diagonal(run):
    out, _config, summary, _hq, _artifact, _scoring = run
    rows = read_parquet_rows(out / "manifest.parquet")
    names = [rule["name"] for rule in summary["rules"]]
    overlap = rule_overlap(rows, names)
    for rule in summary["rules"]:
        assert overlap[rule["name"]][rule["name"]] == rule["dropped"]
    assert all(overlap[a][b] == overlap[b][a] for a in names for b in names)
    # text_big is both the most text and over 7 %: the two text rules overlap on it
    assert overlap["most_text"]["text_over_7pct"] >= 1
    matrix = _table_rows((out / "report.md").read_text(), "## Overlap between rules")
    assert [int(v) for v in matrix[names.index("static") + 1][1:]] == [overlap["static"][b] for b in names]


def test_figures_and_contact_sheets_are_written(run):
    out, _config, summary, _hq, _artifact, _scoring = run
    markdown = (out / "report.md").read_text()
    for column in ("motion_score", "text_area", "aesthetic_score", "clip_score", "raft_motion"):
        image = cv2.imread(str(out / "report" / f"hist_{column}.png"))
        assert image is not None and image.shape[0] > 100, column
        assert f"(report/hist_{column}.png)" in markdown
    for rule in summary["rules"]:
        sheet = out / "report" / f"dropped_{rule['name']}.png"
        assert sheet.exists() == (rule["dropped"] > 0), rule["name"]
    sheet = cv2.imread(str(out / "report" / "dropped_text_over_7pct.png"))
    assert sheet.shape[0] >= 96 and sheet.shape[1] >= 3 * 96  # first | middle | last frame strip


def test_scorer_status_and_hq_section(run):
    out, config, _summary, hq, _artifact, scoring = run
    markdown = (out / "report.md").read_text()
    assert "| text | ran: ppocr detector -> text_area | 0 |" in markdown
    assert "| caption | ran -> caption | 0 |" in markdown
    assert f"- {hq['selected']} of {hq['candidates']} kept clips with a RAFT score selected" in markdown
    assert json.loads((out / "hq" / "summary.json").read_text())["selected"] == hq["selected"]
    assert scoring.clips == sum(1 for _ in read_parquet_rows(out / "manifest.parquet"))


EMBEDDED = re.compile(r"!\[([^\]]+)\]\(data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)\)")


def test_artifact_embeds_every_figure_within_the_size_bound(run, monkeypatch):
    out, config, _summary, _hq, artifact, _scoring = run
    images = EMBEDDED.findall(artifact)
    markdown = (out / "report.md").read_text()
    assert len(images) == markdown.count("![") >= 4 and "figure: `" not in artifact  # all of report.md's figures
    kinds = dict((name, kind) for name, kind, _ in images)
    assert kinds["text_area"] == "png" and kinds["text_over_7pct"] == "jpeg"  # a histogram, a contact sheet
    assert sum(len(data) for *_, data in images) <= ARTIFACT_IMAGE_BYTES and len(artifact) < 1_000_000
    for _name, _kind, data in images:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and 0 < image.shape[1] <= ARTIFACT_MAX_WIDTH
    full = {name: data for name, _, data in images}
    budget = sum(len(data) for data in full.values()) // 3  # a tighter budget: figures shrink, or are linked
    monkeypatch.setattr(report_module, "ARTIFACT_IMAGE_BYTES", budget)
    _, tight = build_report(out, config)
    share = budget // len(images)
    small = EMBEDDED.findall(tight)
    linked = re.findall(r"figure: `(/.+\.png)`", tight)
    assert small and len(small) + len(linked) == len(images)
    assert all(len(data) <= share for *_, data in small)
    assert any(len(data) < len(full[name]) for name, _, data in small)  # scaled down to fit, not dropped


def test_report_names_the_setting_for_scorers_that_did_not_run(run):
    out, _config, _summary, _hq, _artifact, _scoring = run
    markdown, _ = build_report(out, CurationConfig())
    assert "| clip | off: no weights configured; set scorers.clip.pretrained" in markdown
    assert "| raft | off: no weights configured; set scorers.raft.weights" in markdown
    assert "| video_caption | off: no weights configured; set scorers.video_caption.model_path" in markdown
    assert "| llm_summary | off: no weights configured; set scorers.llm_summary.model_path" in markdown


def test_annotations_resume_only_what_is_missing(run):
    out, config, _summary, _hq, _artifact, _scoring = run
    nothing = annotate_sources(out, config, expect_sources=False)
    assert nothing.clips == 0 and not nothing.pools  # every source annotated: no model is loaded
    parts = sorted((out / "work" / "annotations").glob("part-*.parquet"))
    one = read_parquet_rows(parts[0])
    parts[0].unlink()
    again = annotate_sources(out, config, expect_sources=False)
    assert again.clips == len(one)
    redone = read_parquet_rows(parts[0])
    assert [r["clip_id"] for r in redone] == [r["clip_id"] for r in one]
    for new, old in zip(redone, one, strict=True):  # same models, same scores (batch size may differ)
        assert new["caption"] == old["caption"] and new["text_area"] == pytest.approx(old["text_area"], abs=1e-6)
        assert new["aesthetic_score"] == pytest.approx(old["aesthetic_score"], abs=1e-5)


def test_near_duplicates_group_by_the_embeddings_the_clip_scorer_kept(run):
    """With the CLIP scorer on, dedup reads its stored embeddings (no second CLIP pass) and groups exactly the
    clips whose mean embeddings reach dedup.clip_min_cosine, as comparing every pair does."""
    out, config, summary, *_ = run
    rows = read_parquet_rows(RunLayout(out).annotations)
    assert summary["duplicates"]["method"] == "clip"
    assert summary["duplicates"]["clips"] == len(rows) and summary["duplicates"]["unsigned"] == 0
    vectors = np.stack([np.frombuffer(r["clip_embedding"], "<f2").astype(np.float32) for r in rows])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(vectors @ vectors.T >= config.dedup.clip_min_cosine, k=1)), strict=True):
        a, b = root(int(i)), root(int(j))
        parent[max(a, b)] = min(a, b)
    expected: dict[int, set[str]] = {}
    for i, row in enumerate(rows):
        expected.setdefault(root(i), set()).add(row["clip_id"])
    found: dict[str, set[str]] = {}
    for clip_id, group in read_duplicate_groups(out).items():
        found.setdefault(group, set()).add(clip_id)
    assert sorted(map(sorted, found.values())) == sorted(sorted(g) for g in expected.values() if len(g) > 1)
