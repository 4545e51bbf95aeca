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
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
}


def apply_quiet_env() -> None:
    """No telemetry and no token prompts: this machine (and many clusters) has no outbound network."""
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


def ray_init_kwargs(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Arguments for `ray.init`: join `address` (a cluster) or start a small local Ray without a dashboard."""
    apply_quiet_env()
    if address:
        return {"address": address, "ignore_reinit_error": True}
    return {
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "object_store_memory": 256 * 1024 * 1024,
        "log_to_driver": True,
    }
