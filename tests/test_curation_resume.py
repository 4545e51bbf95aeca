"""A run killed with SIGKILL at any moment and rerun ends exactly-once: sources, manifest, shards; after a kill of
`lvd curate`, no Ray worker writes on, and the workers report to the driver's Prefect API."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from dataformat import (
    CLIP_PART_SCHEMA,
    SOURCES_SCHEMA,
    RunLayout,
    parquet_dataset,
    read_parquet_rows,
    read_shard_samples,
)
from dataformat import source_id as _source_id

pytestmark = pytest.mark.slow  # kills and reruns a curation subprocess many times

RUNNER = """
import sys
from curation.dataset import run_sequential, finalize, prepare_output
from curation.config import CurationConfig
print("READY", flush=True)
if sys.argv[3] == "finalize":
    config = CurationConfig()
    for _ in range(50):
        finalize(prepare_output(sys.argv[2], config), config)
else:
    run_sequential(sys.argv[1], sys.argv[2])
"""


def _run_and_kill(videos: Path, out: Path, mode: str, delay: float) -> int | None:
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(videos), str(out), mode],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "READY"
    try:
        return process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return None


def _assert_exactly_once(videos: Path, out: Path) -> None:
    sources = read_parquet_rows(out / "sources.parquet")
    names = Counter(row["source"] for row in sources)
    assert set(names) == {p.name for p in videos.iterdir()} and set(names.values()) == {1}
    manifest = read_parquet_rows(out / "manifest.parquet")
    assert len({m["clip_id"] for m in manifest}) == len(manifest)
    kept = sorted(m["key"] for m in manifest if m["keep"])
    in_shards = sorted(s["key"] for shard in sorted((out / "shards").glob("*.tar")) for s in read_shard_samples(shard))
    assert kept and in_shards == kept
    leftovers = [p for p in out.rglob(".*")]
    assert leftovers == [], leftovers


def _assert_readable_as_datasets(out: Path) -> None:
    """The per-source parts read as pyarrow datasets of whole parts, whatever a killed writer left behind."""
    layout = RunLayout(out)
    for directory, schema in ((layout.sources, SOURCES_SCHEMA), (layout.clip_rows, CLIP_PART_SCHEMA)):
        parts = list(directory.glob("part-*.parquet")) if directory.is_dir() else []
        rows = sum(pq.read_metadata(part).num_rows for part in parts)
        assert parquet_dataset(directory, schema).to_table().num_rows == rows


def test_sigkill_at_any_point_then_rerun_is_exactly_once(sample_dir, tmp_path):
    videos, out = sample_dir / "videos", tmp_path / "run"
    finished = None
    for delay in (0.1, 0.6, 1.3, 2.2):
        finished = _run_and_kill(videos, out, "full", delay)
        _assert_readable_as_datasets(out)  # what a reader sees at any moment of a run
        if finished is not None:
            break
    if finished is None:
        finished = _run_and_kill(videos, out, "full", 60)
    assert finished == 0
    _assert_exactly_once(videos, out)
    # Kill while finalize is rewriting shards and the manifest, repeatedly.
    for delay in (0.03, 0.2, 0.45):
        assert _run_and_kill(videos, out, "finalize", delay) is None
    assert _run_and_kill(videos, out, "full", 60) == 0
    _assert_exactly_once(videos, out)


# `lvd curate` killed with SIGKILL (its whole process group) while Ray workers are in the middle of a source, then
# rerun. One scenario, observed once per module (two CLI runs are the cost); the tests below read what it saw.
CLI_SOURCES = ("bikes.mp4", "cuts_hard.mp4", "static_shot.mp4", "not_a_video.mp4")
# No scorer actors: the workers are what is observed. One source per task run: each task run is named after it.
CLI_SETTINGS = ["--set", "scorers.text.enabled=false", "--sources-per-task", "1"]
ROOT = Path(__file__).resolve().parents[1]
PREFECT_SERVER_MARKS = ("prefect.server.api.server:create_app", "prefect server start")


class _RunProcesses:
    """Every process a run starts (its descendants, also after they are orphaned), sampled while it runs."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.seen: dict[int, tuple[float, int, str]] = {}  # pid -> (start time, parent pid, command line)

    def sample(self) -> None:
        table = {}  # one pass over the process table: pid -> (parent pid, start time)
        for process in psutil.process_iter(["ppid", "create_time"]):
            table[process.pid] = (process.info["ppid"], process.info["create_time"])
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        known = [pid for pid, (started, _, _) in self.seen.items() if table.get(pid, (0, None))[1] == started]
        stack, visited = [self.root_pid, *known], set()
        while stack:
            pid = stack.pop()
            if pid in visited or pid not in table:
                continue
            visited.add(pid)
            if pid not in self.seen:
                with contextlib.suppress(psutil.Error):
                    command = " ".join(psutil.Process(pid).cmdline())
                    self.seen[pid] = (table[pid][1], table[pid][0], command)
            stack.extend(children.get(pid, []))

    def alive(self) -> list[psutil.Process]:
        running = []
        for pid, (started, _, _) in self.seen.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
        return running

    def prefect_servers(self) -> list[tuple[int, int]]:
        """(pid, parent pid) of every Prefect API server the run started."""
        return [(pid, parent) for pid, (_, parent, command) in self.seen.items()
                if any(mark in command for mark in PREFECT_SERVER_MARKS)]

    def stop(self) -> None:
        """Kill, by pid, whatever of the run still runs (the test leaves nothing behind, even when it fails)."""
        for process in self.alive():
            with contextlib.suppress(Exception):
                process.kill()


def _alive_after_sampling(run: _RunProcesses) -> list[psutil.Process]:
    """The run's processes still alive, counting any that a live one started since the last sample."""
    with contextlib.suppress(psutil.Error):
        run.sample()
    return run.alive()


def _committed(out: Path) -> set[str]:
    return {part.name for part in (out / "sources.parquet").glob("part-*.parquet")}


def _staging_in_flight(out: Path) -> bool:
    """A worker has begun writing an uncommitted source's clips: most of its work is still ahead of it."""
    done = {name.removeprefix("part-").removesuffix(".parquet") for name in _committed(out)}
    clips = out / "work" / "clips"
    return clips.is_dir() and any(d.name not in done and any(d.iterdir()) for d in clips.iterdir() if d.is_dir())


def _cli(videos: Path, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(videos), str(out), *CLI_SETTINGS],
                            env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def killed_cli_run(sample_dir, prefect_api, tmp_path_factory) -> dict:
    """Run 1, no Prefect server configured: SIGKILL the CLI's process group as soon as a worker has begun a
    source's clips; wait for every process of the run to be gone and see what was committed by then. Run 2,
    against the `prefect_api` server: complete it."""
    from infra.local import QUIET_ENV, prefect_server_env

    root = tmp_path_factory.mktemp("killed-cli")
    videos, out = root / "videos", root / "out"
    videos.mkdir()
    for name in CLI_SOURCES:
        (videos / name).symlink_to(sample_dir / "videos" / name)
    configured = set(prefect_server_env(root, 1)) - set(QUIET_ENV)  # no server configured: Prefect's default
    env = {key: value for key, value in os.environ.items() if key not in configured and key != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(root / "prefect-home")})
    seen: dict = {}
    process = _cli(videos, out, env, root / "killed.log")
    run = _RunProcesses(process.pid)
    try:
        deadline = time.monotonic() + 600
        while not _staging_in_flight(out):
            assert process.poll() is None, f"the run ended before any work was in flight: {seen}"
            assert time.monotonic() < deadline, "no worker started staging a source within 600 s"
            run.sample()
            time.sleep(0.1)
        run.sample()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        seen["committed_at_kill"] = _committed(out)
        # The workers follow their driver out: wait for every process of the run to be gone (a generous deadline,
        # far beyond the ~0.1 s they take). From then on nothing of the run can write.
        deadline = time.monotonic() + 120
        while (alive := _alive_after_sampling(run)) and time.monotonic() < deadline:
            time.sleep(0.1)
        seen["alive_after_120s"] = [" ".join(p.cmdline())[:160] for p in alive]
        seen["committed_when_gone"] = _committed(out)
        seen["killed_servers"] = run.prefect_servers()
        seen["cli_pid"] = process.pid
        seen["killed_log"] = (root / "killed.log").read_text(errors="replace")
    finally:
        run.stop()
    rerun_env = {**env, "PREFECT_API_URL": prefect_api}
    rerun = _cli(videos, out, rerun_env, root / "rerun.log")
    rerun_processes = _RunProcesses(rerun.pid)
    try:
        deadline = time.monotonic() + 900
        while rerun.poll() is None:
            assert time.monotonic() < deadline, "the rerun did not end within 900 s"
            rerun_processes.sample()
            time.sleep(0.5)
        seen["rerun_code"] = rerun.returncode
        seen["rerun_servers"] = rerun_processes.prefect_servers()
        seen["rerun_log"] = (root / "rerun.log").read_text(errors="replace")
    finally:
        rerun_processes.stop()
    seen.update(videos=videos, out=out)
    return seen


def test_after_sigkill_of_the_cli_no_worker_writes_and_a_rerun_is_exactly_once(killed_cli_run):
    """Ray workers run in their own process groups, so the kill does not reach them: they stage, the driver
    commits, and they exit when the driver is gone."""
    seen = killed_cli_run
    assert not seen["alive_after_120s"], f"processes of the killed run outlive it: {seen['alive_after_120s']}"
    assert seen["committed_when_gone"] == seen["committed_at_kill"], "a source was committed after the kill"
    assert seen["rerun_code"] == 0, seen["rerun_log"][-3000:]
    _assert_exactly_once(seen["videos"], seen["out"])


def test_ray_workers_report_to_the_drivers_prefect_api_and_start_no_server(killed_cli_run, prefect_api):
    """Without a configured server only the driver starts a temporary one, and the workers report to it; with
    one configured (the rerun), nobody starts a server and every `curate-batch` task run is on it."""
    import httpx

    seen = killed_cli_run
    assert seen["killed_servers"], "the killed run started no Prefect server: nothing was observed"
    assert [parent for _, parent in seen["killed_servers"]] == [seen["cli_pid"]], \
        f"Prefect servers (pid, parent pid) other than the driver's: {seen['killed_servers']}"
    assert seen["killed_log"].count("Starting temporary server") == 1
    assert seen["rerun_servers"] == [] and "Starting temporary server" not in seen["rerun_log"]

    rerun_sources = set(CLI_SOURCES) - {name for name in CLI_SOURCES
                                        if f"part-{_source_id(name)}.parquet" in seen["committed_when_gone"]}
    subflow = re.search(r"Beginning subflow run '([^']+)' for flow 'curate-sources'", seen["rerun_log"]).group(1)
    flow_runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [subflow]}},
                                                                  "sort": "START_TIME_DESC", "limit": 1})
    flow_run_id = flow_runs.raise_for_status().json()[0]["id"]
    task_runs = httpx.post(f"{prefect_api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
    curated = {run["name"].split(": ", 1)[1]: run["state_type"] for run in task_runs.raise_for_status().json()
               if run["name"].startswith("curate batch ")}  # "curate batch 2: bikes.mp4"
    assert curated == dict.fromkeys(rerun_sources, "COMPLETED")
