"""Preference studies without a browser: statistics against hand-computed and simulated values, building a study
from real clips, the vote store and the HTTP API, a SIGKILL between votes, and the `lvd study` commands."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.requests import ALLOWED_ROOTS_ENV, RequestError, check_allowed_roots
from common.video import read_frames
from dataformat.preference import StudyLayout, read_study, read_vote_log
from evaluation.preference.request import StudyCreateRequest, StudyResultsRequest, StudyServeRequest
from evaluation.preference.results import compute_results
from evaluation.preference.server import StudyServer, access_token
from evaluation.preference.stats import (
    bootstrap_bradley_terry,
    bradley_terry_from_wins,
    krippendorff_alpha_nominal,
    wilson_interval,
)
from evaluation.preference.store import VoteError, VoteStore
from evaluation.preference.study import create_study
from flows.cli import main
from tests.preference_helpers import CLIP_FRAMES, http, write_system

ROOT = Path(__file__).resolve().parents[1]


def make_study(tmp_path: Path, systems: int = 2, items: int = 3, gold: int = 0, axes: str = "quality,motion",
               records: bool = True) -> StudyLayout:
    specs = []
    for index in range(systems):
        name = "ABCDEFG"[index]
        write_system(tmp_path / "src" / name, index, items, records=records)
        specs.append(f"{name}={tmp_path / 'src' / name}")
    request = StudyCreateRequest.build(output_dir=str(tmp_path / "study"), systems=specs, gold=gold, axes=axes)
    create_study(request)
    return request.layout


# ----------------------------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), half-width 1.96 sqrt(0.016 + 1.96^2/400) / (1 + 0.384)
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 5)  # no successes: [0, z^2 / (n + z^2)]
    assert low == pytest.approx(0, abs=1e-12) and high == pytest.approx(1.959964**2 / (5 + 1.959964**2), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_krippendorff_alpha_matches_hand_computed_and_published_values():
    # two raters, units (l,l) (l,r) (r,r): coincidences o_ll = o_rr = 2, o_lr = o_rl = 1, n_l = n_r = 3, n = 6;
    # alpha = 1 - (n - 1) (o_lr + o_rl) / (n_l n_r + n_r n_l) = 1 - 5 * 2 / 18
    assert krippendorff_alpha_nominal([["l", "l"], ["l", "r"], ["r", "r"]]) == pytest.approx(1 - 10 / 18)
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units, nominal: 0.743
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3]
    c = [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]
    units = [[row[i] for row in (a, b, c, d) if row[i] is not None] for i in range(12)]
    assert round(krippendorff_alpha_nominal(units), 3) == 0.743
    assert math.isnan(krippendorff_alpha_nominal([["l", "l"], ["l"]]))  # one value only: undefined


def mm_reference(wins: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """Hunter's MM iteration, p_i <- W_i / sum_j n_ij / (p_i + p_j), run to convergence."""
    wins = wins + prior / 2 * (1 - np.eye(len(wins)))
    strength = np.ones(len(wins))
    for _ in range(100_000):
        updated = wins.sum(1) / ((wins + wins.T) / (strength[:, None] + strength[None, :])).sum(1)
        updated /= np.exp(np.log(updated).mean())
        if np.max(np.abs(np.log(updated / strength))) < 1e-13:
            break
        strength = updated
    return np.log(updated) - np.log(updated).mean()


def test_bradley_terry_recovers_known_strengths_within_its_intervals():
    true = np.array([0.0, 0.8, -0.6, 1.4])
    true -= true.mean()
    rng = np.random.default_rng(3)
    count = 2400
    a = rng.integers(0, 4, count)
    b = (a + rng.integers(1, 4, count)) % 4
    outcome = (rng.random(count) < 1 / (1 + np.exp(-(true[a] - true[b])))).astype(float)
    scores, low, high = bootstrap_bradley_terry(a, b, outcome, 4, rounds=300, seed=1)
    assert np.all(low <= true) and np.all(true <= high), (true, low, high)
    assert np.all(high - low < 0.5)  # informative, not just wide
    assert np.argsort(scores).tolist() == np.argsort(true).tolist()
    # the intervals cover at their level: 3 systems x 60 simulated studies of 240 votes each
    covered = []
    for study in range(60):
        rng = np.random.default_rng(100 + study)
        a, b = np.repeat([0, 0, 1], 80), np.repeat([1, 2, 2], 80)
        outcome = (rng.random(240) < 1 / (1 + np.exp(-(true[a] - true[b])))).astype(float)
        _, low, high = bootstrap_bradley_terry(a, b, outcome, 3, rounds=100, seed=study)
        centred = true[:3] - true[:3].mean()
        covered += list((low <= centred) & (centred <= high))
    assert 0.88 <= np.mean(covered) <= 0.995, np.mean(covered)
    # raters whose votes move together (each repeats one judgement per pair of systems 20 times): resampling
    # raters widens the interval that resampling votes, as if they were independent, makes too narrow
    rng = np.random.default_rng(7)
    a, b = np.tile(np.repeat([0, 0, 1], 20), 12), np.tile(np.repeat([1, 2, 2], 20), 12)
    judgements = (rng.random((12, 3)) < 1 / (1 + np.exp(-(true[[0, 0, 1]] - true[[1, 2, 2]])))).astype(float)
    outcome, raters = np.repeat(judgements, 20, axis=1).ravel(), np.repeat(np.arange(12), 60)
    _, low_votes, high_votes = bootstrap_bradley_terry(a, b, outcome, 3, rounds=200)
    _, low_raters, high_raters = bootstrap_bradley_terry(a, b, outcome, 3, rounds=200, groups=raters)
    assert np.all(high_raters - low_raters > 2 * (high_votes - low_votes))
    # the Newton fit is the optimum Zermelo's MM iteration converges to (a system that never won included)
    wins = np.random.default_rng(0).integers(0, 30, (5, 5)).astype(float) * (1 - np.eye(5))
    wins[0] = 0
    assert np.allclose(bradley_terry_from_wins(wins), mm_reference(wins), atol=1e-9)
    # ties are half a win each way: all-tie votes give equal scores, a tie between a winner and a loser narrows them
    assert np.allclose(bootstrap_bradley_terry([0, 1], [1, 2], [0.5, 0.5], 3, rounds=10)[0], 0)


# ----------------------------------------------------------------------------------------------- the study


def test_study_pairs_by_generation_record_randomises_sides_and_plants_gold(tmp_path):
    for index, name in enumerate("ABC"):  # B names its files differently: the records, not the stems, pair them
        stems = [f"{name.lower()}-{i}" for i in (2, 0, 1, 3)] if name == "B" else None
        write_system(tmp_path / name, index, 4, stems=stems)
    write_system(tmp_path / "extra", 0, 5)  # its prompt 4 is in C only, below
    (tmp_path / "C" / "004.mp4").write_bytes((tmp_path / "extra" / "004.mp4").read_bytes())
    (tmp_path / "C" / "004.json").write_bytes((tmp_path / "extra" / "004.json").read_bytes())
    request = StudyCreateRequest.build(output_dir=str(tmp_path / "study"), gold=3, seed=5,
                                       systems=[f"{n}={tmp_path / n}" for n in "ABC"])
    manifest = create_study(request)
    layout = request.layout
    _, pairs = read_study(layout)
    assert manifest.pairing == "metadata" and manifest.items == 4 and manifest.unmatched == {"C": ["004.mp4"]}
    real = [pair for pair in pairs if pair.gold is None]
    assert len(real) == 4 * 3 and len(pairs) == 4 * 3 + 3
    # every two systems on every item, and each prompt's videos are the same prompt in every system
    assert {(p.item, frozenset((p.left, p.right))) for p in real} == {
        (item, frozenset(combo)) for item in {p.item for p in real} for combo in (("A", "B"), ("A", "C"), ("B", "C"))}
    assert {p.label for p in real} == {f"prompt {i}" for i in range(4)}
    lefts = [p.left < p.right for p in real]
    assert 0 < sum(lefts) < len(lefts)  # both orders occur
    for pair in real:  # the transcoded copy is the system's video of that prompt (frames match the source)
        frames, _ = read_frames(layout.root / pair.left_video)
        assert len(frames) == CLIP_FRAMES and frames[0].shape == (72, 128, 3)
    import cv2

    for pair in (p for p in pairs if p.gold is not None):
        assert "gold" in (pair.left, pair.right) and pair.gold == ("left" if pair.right == "gold" else "right")
        original, _ = read_frames(layout.root / (pair.left_video if pair.gold == "left" else pair.right_video))
        degraded, _ = read_frames(layout.root / (pair.right_video if pair.gold == "left" else pair.left_video))
        sharpness = [np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in v])
                     for v in (original, degraded)]
        assert len(degraded) == len(original) and sharpness[1] < sharpness[0] / 5
        steps = [np.abs(degraded[i + 1].astype(int) - degraded[i]).mean() for i in range(len(degraded) - 1)]
        assert sum(step < 1.0 for step in steps) >= len(steps) // 2  # frames held: the copy stutters


def test_study_pairs_by_file_stem_without_records_and_rejects_bad_input(tmp_path, monkeypatch):
    layout = make_study(tmp_path, records=False)
    assert read_study(layout)[0].pairing == "stem"
    with pytest.raises(RequestError, match="already holds a study"):
        StudyCreateRequest.build(output_dir=str(layout.root), systems=[f"A={tmp_path}/src/A", f"B={tmp_path}/src/B"]
                                 ).check_inputs()
    with pytest.raises(RequestError, match="at least two systems"):
        StudyCreateRequest.build(systems=[f"A={tmp_path}"])
    with pytest.raises(RequestError, match="system 'A' given twice"):
        StudyCreateRequest.build(systems=["A=x", "A=y"])
    with pytest.raises(RequestError, match="axis 'look and feel'"):
        StudyCreateRequest.build(systems=["A=x", "B=y"], axes="quality,look and feel")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "000.mp4").write_bytes(b"not a video at all")
    request = StudyCreateRequest.build(output_dir=str(tmp_path / "s2"),
                                       systems=[f"A={tmp_path}/src/A", f"X={tmp_path}/broken"])
    with pytest.raises(RequestError, match=r"system X: .*000.mp4: cannot decode"):
        create_study(request)
    assert not (tmp_path / "s2" / "study.json").exists()
    (tmp_path / "src" / "B" / "001.json").write_text("{truncated")  # a damaged generation record
    request = StudyCreateRequest.build(output_dir=str(tmp_path / "s3"),
                                       systems=[f"A={tmp_path}/src/A", f"B={tmp_path}/src/B"])
    with pytest.raises(RequestError, match=r"system B: .*001.json: unreadable generation record"):
        create_study(request)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "src"))  # a served run reads and writes only inside
    with pytest.raises(RequestError, match=r"systems \(B\): /etc is outside the allowed roots"):
        StudyCreateRequest.build(systems=[f"A={tmp_path}/src/A", "B=/etc"])
    with pytest.raises(RequestError, match="output_dir: /tmp/elsewhere is outside the allowed roots"):
        check_allowed_roots(StudyCreateRequest.build(output_dir="/tmp/elsewhere",
                                                     systems=[f"A={tmp_path}/src/A", f"B={tmp_path}/src/B"]))


# ---------------------------------------------------------------------------------------------- store + API


def test_store_continues_each_rater_where_they_were_and_refuses_bad_votes(tmp_path):
    layout = make_study(tmp_path, gold=1)
    store = VoteStore(layout)
    first = store.next_pair("ann")
    store.cast({"pair": first["pair"], "rater": "ann", "axis": "quality", "choice": "left"})
    bad = [({"pair": "nope", "rater": "ann", "axis": "quality", "choice": "left"}, "no pair 'nope'"),
           ({"pair": ["p00001"], "rater": "ann", "axis": "quality", "choice": "left"}, r"no pair \['p00001'\]"),
           ({"pair": first["pair"], "rater": "a b", "axis": "quality", "choice": "left"}, "rater must be"),
           ({"pair": first["pair"], "rater": "ann", "axis": "smell", "choice": "left"}, "axis must be one of"),
           ({"pair": first["pair"], "rater": "ann", "axis": "quality", "choice": "up"}, "choice must be one of"),
           ({"pair": first["pair"], "rater": "ann", "axis": "quality"}, "missing: choice"),
           ({"pair": first["pair"], "rater": "ann", "axis": "quality", "choice": "left", "x": 1}, "unknown: x"),
           (["a list"], "a vote is a JSON object")]
    for vote, message in bad:
        with pytest.raises(VoteError, match=message):
            store.cast(vote)
    store.close()
    store = VoteStore(layout)  # a restart: ann is back on the same pair with her quality vote
    again = store.next_pair("ann")
    assert again["pair"] == first["pair"] and again["voted"] == {"quality": "left"}
    assert store.next_pair("bob")["progress"] == {"done": 0, "total": 4}
    assert len(read_vote_log(layout.votes)[0]) == 1
    store.close()
    with layout.votes.open("ab") as handle:  # a kill in the middle of writing a vote: its partial line goes
        handle.write(b'{"pair":"p00002","rater":"ann","ax')
    store = VoteStore(layout)
    store.cast({"pair": first["pair"], "rater": "ann", "axis": "motion", "choice": "none"})
    assert [v["choice"] for v in read_vote_log(layout.votes)[0]] == ["left", "none"]
    assert store.next_pair("ann")["pair"] != first["pair"]
    store.close()


def test_api_serves_pairs_votes_and_ranged_media_with_a_token(tmp_path):
    layout = make_study(tmp_path)
    server = StudyServer(StudyServeRequest.build(output_dir=str(layout.root), port=0, token="t" * 20)).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http(f"{base}/api/next?rater=ann")[0] == 403
        assert http(f"{base}/api/next?rater=ann&token={'x' * 20}")[0] == 403
        status, pair = http(f"{base}/api/next?rater=ann&token={'t' * 20}")
        assert status == 200 and pair["done"] is False and pair["axes"] == ["quality", "motion"]
        assert pair["left"] == f"/media/{pair['pair']}/left" and "A" not in pair["left"] + pair["right"]
        headers = {"X-Study-Token": "t" * 20}
        status, body = http(f"{base}/api/votes", {"pair": pair["pair"], "rater": "ann", "axis": "motion",
                                                  "choice": "right"}, headers)
        assert status == 200 and body["ok"] is True
        status, body = http(f"{base}/api/votes", {"pair": pair["pair"], "rater": "ann", "axis": "x",
                                                  "choice": "right"}, headers)
        assert status == 400 and body["error"] == "axis must be one of quality, motion, got 'x'"
        status, body = http(f"{base}/api/votes", b"{not json", headers)
        assert status == 400 and body == {"error": "a vote must be JSON"}
        status, body = http(f"{base}/api/votes", b"x" * 5000, headers)
        assert status == 400 and "1-4096 bytes" in body["error"]
        assert [v["axis"] for v in read_vote_log(layout.votes)[0]] == ["motion"]
        _, pairs = read_study(layout)
        video = (layout.root / next(p.left_video for p in pairs if p.id == pair["pair"])).read_bytes()
        status, body = http(f"{base}{pair['left']}", headers={**headers, "Range": "bytes=100-199"})
        assert status == 206 and body == video[100:200]
        status, body = http(f"{base}{pair['left']}?token={'t' * 20}")
        assert status == 200 and body == video
        assert http(f"{base}/media/p99999/left", headers=headers)[0] == 404
    finally:
        server.stop()


def test_a_token_is_required_off_loopback():
    def token(**fields):
        return access_token(StudyServeRequest.build(output_dir=".", **fields))

    assert token(host="127.0.0.1") is None and token(host="localhost") is None and token(host="::1") is None
    made = {token(host="0.0.0.0"), token(host="192.168.1.20"), token(host="::")}
    assert len(made) == 3 and all(len(value) == 32 for value in made)  # random, 192 bits each
    assert token(host="0.0.0.0", token="r" * 16) == "r" * 16 and token(token="r" * 16) == "r" * 16
    with pytest.raises(RequestError, match="token must be 16-128"):
        token(token="short")


SERVE_SCRIPT = """
import sys
from evaluation.preference.request import StudyServeRequest
from evaluation.preference.server import serve_study
serve_study(StudyServeRequest.build(output_dir=sys.argv[1], port=0), announce=lambda line: print(line, flush=True))
"""


def start_server_process(study: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(study)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = process.stdout.readline()
    assert line.startswith("rating page: http://127.0.0.1:"), line
    return process, line.split(": ", 1)[1].strip().rstrip("/")


def test_sigkill_between_votes_loses_none(tmp_path):
    layout = make_study(tmp_path, items=3)
    cast = []
    for kill in range(3):
        process, base = start_server_process(layout.root)
        try:
            for _ in range(2):
                pair = http(f"{base}/api/next?rater=ann")[1]
                axis = next(axis for axis in pair["axes"] if axis not in pair["voted"])
                vote = {"pair": pair["pair"], "rater": "ann", "axis": axis, "choice": ["left", "right", "none"][kill]}
                assert http(f"{base}/api/votes", vote)[0] == 200
                cast.append(vote)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
    assert [{k: v[k] for k in ("pair", "rater", "axis", "choice")} for v in read_vote_log(layout.votes)[0]] == cast
    process, base = start_server_process(layout.root)  # the lock of the killed server is taken over
    try:
        assert http(f"{base}/api/next?rater=ann")[1] == {"done": True, "axes": ["quality", "motion"],
                                                         "progress": {"done": 3, "total": 3}}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ results


def simulate_votes(layout: StudyLayout, strengths: dict[str, float], raters: int, seed: int,
                   ties: float = 0.0) -> None:
    """Every rater judges every pair on every axis, choosing by Bradley-Terry with `strengths`; gold pairs right
    except for the raters named bad-*, who choose at random."""
    rng = np.random.default_rng(seed)
    store = VoteStore(layout)
    manifest, pairs = read_study(layout)
    for number in range(raters):
        rater = f"bad-{number}" if number < 2 else f"r{number}"
        for pair in pairs:
            for axis in manifest.axes:
                if pair.gold is not None:
                    choice = str(rng.choice(["left", "right", "none"])) if rater.startswith("bad") else pair.gold
                elif rng.random() < ties:
                    choice = "none"
                else:
                    p_left = 1 / (1 + math.exp(strengths[pair.right] - strengths[pair.left]))
                    choice = "left" if rng.random() < p_left else "right"
                store.cast({"pair": pair.id, "rater": rater, "axis": axis, "choice": choice})
    store.close()


def test_results_recover_simulated_strengths_and_screen_raters_by_gold(tmp_path):
    layout = make_study(tmp_path, systems=3, items=4, gold=2, axes="quality")
    strengths = {"A": 0.9, "B": 0.0, "C": -0.9}
    simulate_votes(layout, strengths, raters=42, seed=1)  # 95 % intervals: the coverage test is above
    summary = compute_results(StudyResultsRequest.build(output_dir=str(layout.root), min_gold_accuracy=0.9,
                                                        bootstrap_rounds=300))
    assert sorted(summary["dropped_raters"]) == ["bad-0", "bad-1"]  # random on 2 gold pairs: < 90 % right
    good = [row for row in summary["raters"] if row["kept"]]
    assert len(good) == 40 and all(row["gold_accuracy"] == 1.0 for row in good)
    scores = {row["system"]: row for row in summary["by_axis"]["quality"]["scores"]}
    for system, strength in strengths.items():  # strengths are centred already
        assert scores[system]["low"] <= strength <= scores[system]["high"], (system, scores[system])
    pairs = {(row["system_a"], row["system_b"]): row for row in summary["by_axis"]["quality"]["pairs"]}
    expected = 1 / (1 + math.exp(-0.9))
    assert pairs["A", "B"]["votes"] == 40 * 4 and pairs["A", "B"]["low"] <= expected <= pairs["A", "B"]["high"]
    agreement = summary["by_axis"]["quality"]["agreement"]
    assert agreement["units"] == 12 and agreement["raters"] == 40 and -0.1 < agreement["alpha"] < 0.3
    import pyarrow.parquet as pq

    assert pq.read_table(layout.scores).num_rows == 3 and pq.read_table(layout.raters).num_rows == 42
    assert layout.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_creates_a_study_and_prints_results_as_json(tmp_path, capsys):
    write_system(tmp_path / "A", 0, 2)
    write_system(tmp_path / "B", 1, 2)
    study = tmp_path / "study"
    assert main(["study", "create", str(study), "--system", f"A={tmp_path / 'A'}", "--system",
                 f"B={tmp_path / 'B'}", "--axes", "quality"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["pairs"] == 2 and created["pairing"] == "metadata"
    store = VoteStore(StudyLayout(study))
    _, pairs = read_study(StudyLayout(study))
    for rater, side in (("ann", "A"), ("bob", "A"), ("cy", "B")):
        for pair in pairs:
            choice = "left" if pair.left == side else "right"
            store.cast({"pair": pair.id, "rater": rater, "axis": "quality", "choice": choice})
    store.cast({"pair": pairs[0].id, "rater": "cy", "axis": "quality", "choice": "none"})  # cy changes her mind
    store.close()
    assert main(["study", "results", str(study), "--json", "--bootstrap-rounds", "10"]) == 0
    row = json.loads(capsys.readouterr().out)["by_axis"]["quality"]["pairs"][0]
    assert (row["system_a"], row["system_b"], row["votes"], row["wins_a"], row["ties"]) == ("A", "B", 6, 4, 1)
    assert row["win_rate"] == pytest.approx(4.5 / 6) and row["interval"] == list(wilson_interval(4.5, 6))
    assert main(["study", "results", str(tmp_path / "A")]) == 2
    assert "not a study (no study.json" in capsys.readouterr().err
    assert main(["study", "serve", str(study), "--port", "70000"]) == 2
    assert "port must be <= 65535" in capsys.readouterr().err
    server = StudyServer(StudyServeRequest.build(output_dir=str(study), port=0)).start()
    try:  # the port is taken
        assert main(["study", "serve", str(study), "--port", str(server.port)]) == 2
        assert f"cannot listen on 127.0.0.1:{server.port} (Address already in use)" in capsys.readouterr().err
    finally:
        server.stop()
    with (study / "votes.jsonl").open("ab") as handle:
        handle.write(b"garbage\n")
    assert main(["study", "results", str(study)]) == 2
    assert "votes.jsonl:8: not a vote line: b'garbage'" in capsys.readouterr().err
