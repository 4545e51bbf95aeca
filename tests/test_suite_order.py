"""`make test` starts the modules longest first, by the times a run recorded (tests/durations.json), not by a
hand-kept list: recording, reading (missing, stale, corrupt entries) and the order collection produces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import module_start_order, recorded_durations

ROOT = Path(__file__).resolve().parents[1]


def _pytest(durations_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LVD_TEST_DURATIONS_FILE": str(durations_file), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unmeasured_modules_start_first_then_the_longest():
    slow_tests = {"test_a.py": 0, "test_b.py": 3, "test_c.py": 0, "test_new.py": 1, "test_newer.py": 2}
    durations = {"test_a.py": 10.0, "test_b.py": 300.0, "test_c.py": 45.5, "test_gone.py": 999.0}
    assert module_start_order(slow_tests, durations) == ["test_newer.py", "test_new.py", "test_b.py", "test_c.py",
                                                         "test_a.py"]
    assert module_start_order(slow_tests, {}) == ["test_b.py", "test_newer.py", "test_new.py", "test_a.py",
                                                  "test_c.py"]


def test_a_missing_or_corrupt_durations_file_orders_nothing(tmp_path):
    assert recorded_durations(tmp_path / "absent.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert recorded_durations(tmp_path / "list.json") == {}
    (tmp_path / "mixed.json").write_text('{"test_a.py": 12.5, "test_b.py": "long", "test_c.py": true}')
    assert recorded_durations(tmp_path / "mixed.json") == {"test_a.py": 12.5}
    (tmp_path / "torn.json").write_text('{"test_a.py": 1')
    import pytest

    with pytest.warns(UserWarning, match="unreadable"):
        assert recorded_durations(tmp_path / "torn.json") == {}


def test_a_run_starts_modules_by_their_recorded_time_and_records_the_modules_it_ran(tmp_path):
    """One real pytest run: given in the order docs, suite-order, it runs suite-order first (recorded longer),
    then writes this run's times of both, keeps the module it did not run and drops the one that is gone."""
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"test_suite_order.py": 50.0, "test_docs.py": 1.0, "test_train_flow.py": 300.0,
                                     "test_gone.py": 5.0}))
    run = _pytest(durations, "-v", "--record-durations", "tests/test_docs.py", "tests/test_suite_order.py",
                  "-k", "contents or unmeasured")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ran = [line.split("::")[0] for line in run.stdout.splitlines() if "::" in line and "PASSED" in line]
    assert list(dict.fromkeys(ran)) == ["tests/test_suite_order.py", "tests/test_docs.py"]
    recorded = json.loads(durations.read_text())
    assert set(recorded) == {"test_docs.py", "test_suite_order.py", "test_train_flow.py"}
    assert recorded["test_train_flow.py"] == 300.0 and recorded["test_suite_order.py"] < 50.0  # this run's time
    assert list(recorded) == sorted(recorded, key=lambda name: -recorded[name])  # longest first
    assert not list(tmp_path.glob(".durations.json.*")), "the file is replaced atomically"
