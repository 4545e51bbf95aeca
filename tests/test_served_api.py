"""The served API: `lvd serve --local` (and `make demo`) start the Prefect API with an auth string, so other local
processes cannot start deployments while the same user's Prefect CLI works through the client settings file it
writes; `--allow-root` confines every path parameter of a served run to the given folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.requests import ALLOWED_ROOTS_ENV, RequestError, check_allowed_roots, flat_parameters
from generation.generate import GenerateRequest
from infra.local import API_AUTH_FILE, CLIENT_ENV_FILE, api_auth_string
from training.request import StageRunRequest

ROOT = Path(__file__).resolve().parents[1]
READ_DEPLOYMENT = """
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("train-stage/local")
    print("deployment", deployment.name, deployment.parameter_openapi_schema["title"])
"""
# A run that asks to write outside the allowed roots, as `prefect deployment run train-stage/local --param ...` does.
RUN_OUTSIDE = """
import sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
run = run_deployment("train-stage/local", parameters={"stage": 1, "data": sys.argv[1], "output_root": sys.argv[2]},
                     timeout=240)
with get_client(sync_client=True) as client:
    state = client.read_flow_run(run.id).state
print("STATE", state.type.value, state.message)
"""


def test_path_settings_are_confined_to_the_allowed_roots(tmp_path: Path, monkeypatch) -> None:
    """Every path setting, outputs included, resolved through `..` and symlinks, must lie inside a root; values
    that name nothing on disk as inputs (the 'tiny' preset, a cached hub id) and URLs are left alone."""
    allowed, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    (allowed / "data").mkdir(parents=True)
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    received = []

    @flat_parameters(StageRunRequest)
    def served_flow(request: StageRunRequest) -> None:
        received.append(request)

    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(allowed))
    served_flow(stage=1, data=str(allowed / "data"), output_root=str(allowed / "runs"), init="tiny")
    assert len(received) == 1
    for output_root in (str(allowed / ".." / "elsewhere"), str(allowed / "escape" / "runs"), "/etc/cron.d"):
        with pytest.raises(RequestError, match=r"output_root: .* is outside the allowed roots"):
            served_flow(stage=1, data=str(allowed / "data"), output_root=output_root)
    with pytest.raises(RequestError, match=r"data: .* is outside the allowed roots"):
        served_flow(stage=1, data=str(outside), output_root=str(allowed / "runs"))
    with pytest.raises(RequestError, match=r"image: .* is outside the allowed roots"):
        check_allowed_roots(GenerateRequest.build({"image": "/etc/hostname", "output_dir": str(allowed / "g")}))
    check_allowed_roots(GenerateRequest.build({"image": "s3://bucket/cat.png", "output_dir": str(allowed / "g")}))
    monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    served_flow(stage=1, data=str(outside), output_root="/tmp/anywhere")  # a user's own run: not confined
    assert len(received) == 2


def _client_env(home: Path) -> dict[str, str]:
    """What `set -a; . HOME/client.env; set +a` gives a shell."""
    pairs = (line.split("=", 1) for line in (home / CLIENT_ENV_FILE).read_text().splitlines() if line)
    return dict(pairs)


def test_the_auth_string_is_made_once_and_kept_private(tmp_path: Path) -> None:
    first = api_auth_string(tmp_path)
    user, _, token = first.partition(":")
    assert user == "lvd" and len(token) >= 40
    assert (tmp_path / API_AUTH_FILE).stat().st_mode & 0o777 == 0o600
    assert api_auth_string(tmp_path) == first  # kept across restarts: the UI login and client.env stay valid
    assert api_auth_string(tmp_path / "other") != first
    (tmp_path / API_AUTH_FILE).chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        api_auth_string(tmp_path)


@pytest.mark.slow
def test_served_api_needs_the_auth_string_and_the_users_cli_has_it(tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "client-home")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--local", "--home", str(home),
                               "--flow", "train-stage", "--allow-root", str(allowed)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # served once the runner has registered the deployment
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            if (home / CLIENT_ENV_FILE).exists():
                client = _client_env(home)
                probe = subprocess.run([sys.executable, "-c", READ_DEPLOYMENT], cwd=ROOT, env={**env, **client},
                                       capture_output=True, text=True, timeout=120)
                if probe.returncode == 0:
                    break
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert "deployment local" in probe.stdout
        assert client["PREFECT_API_AUTH_STRING"] == (home / API_AUTH_FILE).read_text().strip()
        assert (home / CLIENT_ENV_FILE).stat().st_mode & 0o777 == 0o600

        # Any other local process, with the URL but not the string, is refused: no deployment can be started.
        without = {**env, "PREFECT_API_URL": client["PREFECT_API_URL"]}
        refused = subprocess.run([sys.executable, "-c", READ_DEPLOYMENT], cwd=ROOT, env=without,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout
        request = urllib.request.Request(client["PREFECT_API_URL"] + "/deployments/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(request, timeout=30)
        assert raw.value.code == 401
        with urllib.request.urlopen(client["PREFECT_API_URL"] + "/health", timeout=30) as health:
            assert health.status == 200  # the health probe stays open

        # The user's run that writes outside the allowed root fails in its first step, naming the setting.
        escape = str(allowed / ".." / "outside")
        run = subprocess.run([sys.executable, "-c", RUN_OUTSIDE, str(allowed / "data"), escape], cwd=ROOT,
                             env={**env, **client}, capture_output=True, text=True, timeout=300)
        assert "STATE FAILED" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
        assert "is outside the allowed roots" in run.stdout + (tmp_path / "serve.log").read_text()
        assert not (tmp_path / "outside").exists()
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: `lvd serve` stops its Prefect server on the way out
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()
    with pytest.raises(urllib.error.URLError):  # the server went with it
        urllib.request.urlopen(client["PREFECT_API_URL"] + "/health", timeout=10)
