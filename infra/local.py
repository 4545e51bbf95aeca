"""Local stand-ins for the cluster services: a Prefect server on loopback (SQLite) and a local Ray.

Tests, `lvd serve` and `lvd demo` all start their services through these helpers, so the embedded
defaults live in one place. On a real cluster neither is used: PREFECT_API_URL points at the team's
server and `ray_address` at the cluster (`ray://head:10001`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
}
# Ray's authentication stays at Ray's default (a token in ~/.ray/auth_token for a new local cluster): the local
# Ray is on loopback, and the token also keeps other users of this machine from submitting tasks into it.

# Ray's switch for "this node is a single-machine cluster": its node address becomes 127.0.0.1, so GCS, raylet,
# object manager, workers and agents bind to loopback only. Without it Ray turns a node IP of 127.0.0.1 into the
# machine's network address and listens on every interface.
_RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def apply_quiet_env() -> None:
    """No telemetry: this machine (and many clusters) has no outbound network."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def prefect_server_env(home: Path, port: int) -> dict[str, str]:
    """Environment that makes Prefect clients and the server use `home` (SQLite) on loopback:`port`."""
    home = Path(home).resolve()
    return {
        **QUIET_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    }


@contextlib.contextmanager
def local_prefect_server(home: Path, port: int | None = None, log_path: Path | None = None) -> Iterator[str]:
    """Start `prefect server start` on 127.0.0.1 with a SQLite database under `home`; yield its API URL.

    The server is stopped (and its children with it) when the context exits.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, **prefect_server_env(home, port)}
    log_path = log_path or home / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{api_url}/health", process=process)
        yield api_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def _ray_on_loopback(single_node: bool) -> None:
    """Make the next `ray.init` in this process pick 127.0.0.1 (single_node) or the network address as node IP.

    Ray reads the switch into a constant when it is first imported, so an already imported Ray is updated too;
    the environment variable carries the choice to the processes the local Ray starts.
    """
    if single_node:
        os.environ[_RAY_SINGLE_NODE_ENV] = "0"
    elif os.environ.get(_RAY_SINGLE_NODE_ENV) == "0":
        del os.environ[_RAY_SINGLE_NODE_ENV]
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = not single_node


def ray_init_kwargs(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Arguments for `ray.init`: join exactly `address` (a cluster), or start an own local Ray on loopback.

    Without an address the run never joins another cluster on this machine: not one from `ray start` (live, or
    dead with its address file left behind in Ray's temp dir), nor one named by RAY_ADDRESS. Its processes
    listen on 127.0.0.1 only, and it has no dashboard.
    """
    apply_quiet_env()
    if address:
        _ray_on_loopback(False)
        return {"address": address, "ignore_reinit_error": True}
    _ray_on_loopback(True)
    return {
        "address": "local",
        "_node_ip_address": "127.0.0.1",
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "object_store_memory": 256 * 1024 * 1024,
        "log_to_driver": True,
    }
