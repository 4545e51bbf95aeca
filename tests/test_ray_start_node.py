"""Next to a real `ray start --head --num-cpus 1` node on loopback (`infra.local.local_ray_cluster`, its own temp dir
and ports, stopped by its session): `lvd train` on its own local Ray stays quiet about the other Ray, and
`lvd curate --ray-address` to the node is refused in one line, before any work, when the node is too small for the
scorer pools or when the driver does not authenticate with a token."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation.sample_data import VIDEO_DIR
from infra.local import LocalRayCluster, local_ray_cluster

pytestmark = pytest.mark.slow  # a `ray start` node and CLI subprocesses

# Generous: the refusals take seconds; a run that waits forever at 0 sources must still end the test.
REFUSAL_DEADLINE_S = 300


@pytest.fixture(scope="module")
def one_cpu_node() -> Iterator[LocalRayCluster]:
    """One `ray start --head --num-cpus 1` node, shared by the module's tests; every process it started is gone
    after them."""
    with local_ray_cluster(nodes=1, cpus_per_node=1) as cluster:
        yield cluster
    assert not cluster.head.pids(), "the Ray node left processes behind"


def _env(**updates: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    for key, value in updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _raw(sample_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for name in ("bikes.mp4", "static_shot.mp4"):
        shutil.copy(sample_dir / VIDEO_DIR / name, folder / name)
    return folder


def test_lvd_train_says_nothing_about_another_ray_on_the_machine(one_cpu_node, curated_dir, tmp_path):
    """Ray Train's PlacementGroupCleaner asked Ray's state API with no address, found two Rays on the machine and
    died with a 30-line traceback in every `lvd train`'s output; on its own local Ray the run has no cleaner."""
    command = [sys.executable, "-m", "flows.cli", "train", "--stage", "1", "--data", str(curated_dir),
               "--max-steps", "2", "--output-root", str(tmp_path / "train")]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert one_cpu_node.head.raylet_pid() is not None, "the other Ray was gone during the run: nothing was tested"
    assert (tmp_path / "train" / "stage1" / "done.json").is_file()
    for noise in ("Traceback", "PlacementGroupCleaner", "multiple active Ray instances"):
        assert noise not in run.stderr, run.stderr[-3000:]


def test_a_cluster_too_small_for_the_scorer_pools_is_refused_in_one_line(one_cpu_node, sample_dir, tmp_path):
    """One CPU: the text scorer's pool reserves half of it and a curate-batch task needs a whole one, so no source
    could ever start (the run used to wait forever at 0 sources). Refused before any work, nothing written: a rerun
    on a bigger cluster starts clean."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flows.cli", "curate", str(_raw(sample_dir, tmp_path)), str(out),
               "--ray-address", one_cpu_node.address]
    run = subprocess.run(command, env=_env(RAY_AUTH_MODE="token"), capture_output=True, text=True,
                         timeout=REFUSAL_DEADLINE_S)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith("lvd curate: error: the Ray cluster has 1 CPU(s)"), lines[0]
    assert "text: 1 x 0.5" in lines[0] and "curate-batch task needs 1" in lines[0], lines[0]
    assert not out.exists()


def test_a_driver_without_token_auth_is_told_what_to_set_in_one_line(one_cpu_node, tmp_path):
    """`ray start` turns token authentication on: a driver with it off gets one line naming RAY_AUTH_MODE=token and
    where the token is, instead of twenty GCS retry warnings and a traceback."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flows.cli", "curate", str(tmp_path), str(out), "--ray-address",
               one_cpu_node.address]
    run = subprocess.run(command, env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True,
                         timeout=REFUSAL_DEADLINE_S)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith("lvd curate: error: ") and "set RAY_AUTH_MODE=token" in lines[0], lines[0]
    assert "~/.ray/auth_token" in lines[0], lines[0]
    assert not out.exists()


def test_a_failed_ray_start_is_started_again(monkeypatch):
    """Under load a `ray start` can miss Ray's fixed start-up deadlines (CI: the head's raylet did not register
    within 30 s). Here the head's first start fails for real (its port is taken by another listener): the failed
    start leaves nothing running and the head comes up on a fresh port."""
    import socket

    import infra.local as local

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port])
        real_free_port = local.free_port
        monkeypatch.setattr(local, "free_port", lambda: next(ports, None) or real_free_port())
        with local_ray_cluster(nodes=1, cpus_per_node=1) as cluster:
            assert cluster.address != f"127.0.0.1:{taken_port}"
            assert cluster.head.raylet_pid() is not None
            log = (cluster.root / "node0.log").read_text(errors="replace")
            assert str(taken_port) in log, "the first start did not fail on the taken port: nothing was tested"
        assert not cluster.head.pids()
