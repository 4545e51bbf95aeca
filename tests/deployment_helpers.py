"""Run a flow the way users do: `lvd serve` its deployment, then `prefect deployment run FLOW/local --watch`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def wait_for_deployment(env: dict, name: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll the server's REST API (cheap) until `lvd serve` has registered deployment `name` (`flow/deployment`)."""
    import httpx

    url = f"{env['PREFECT_API_URL'].rstrip('/')}/deployments/name/{name}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"lvd serve exited early with code {server.returncode}")
        if httpx.get(url, timeout=10).status_code == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"deployment {name} was not registered")


def run_served_deployment(flow_name: str, parameters: list[str], env: dict, log_dir: Path, *,
                          register_timeout_s: float, watch_timeout_s: int, timeout_s: float) -> None:
    """Serve `flow_name`'s deployments, run `flow_name/local` with `parameters` (prefect CLI flags) until it
    ends, assert it completed (with the serve log in the message when not), and stop the server."""
    env = {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # start the run within 1 s, not up to 10 s, of the request
    log_path = Path(log_dir) / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--flow", flow_name],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_deployment(env, f"{flow_name}/local", server, register_timeout_s)
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", f"{flow_name}/local", *parameters,
             "--watch", "--watch-timeout", str(watch_timeout_s)],
            env=env, capture_output=True, text=True, timeout=timeout_s,
        )
        serve_log = log_path.read_text()[-5000:]
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + serve_log
        assert "Completed" in run.stdout + run.stderr
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
