"""`lvd demo` (`make demo`): the main job on embedded defaults, on this machine.

Starts a Prefect server on 127.0.0.1 (SQLite under .lvd/prefect), serves every deployment, runs the
whole DAG (`lvd-pipeline`: curate -> train stages 1-3 -> FVD -> generate) on the bundled sample clips
with local Ray and the tiny presets, prints where everything is, and keeps serving so the runs can be
inspected in the UI (Ctrl-C stops; `--exit` stops at once). Rerunning is safe: finished steps are skipped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.requests import Request, RequestError, setting
from flows.cli import add_request_command
from infra.local import local_prefect_api, start_logged

DEMO_DEPLOYMENT = "lvd-pipeline/local"


@dataclass(frozen=True)
class DemoRequest(Request):
    """`lvd demo`: where the local state and the outputs go, and whether to keep serving afterwards."""

    home: str = setting(".lvd", path="output", help="local state (Prefect SQLite DB, logs)")
    output: str = setting("demo-out", path="output", help="where the demo writes its outputs")
    exit_after: bool = setting(False, flag="--exit", help="stop the server once the run has finished")

    def check_inputs(self) -> None:
        """Both folders can be written (a server and a whole DAG run would otherwise fail minutes in)."""
        from curation.dataset import check_output_dir

        for name in ("home", "output"):
            try:
                check_output_dir(getattr(self, name))
            except RequestError as error:
                raise RequestError(f"{name}: {error}") from None


def _wait_for_deployment(name: str, server: subprocess.Popen, stop: threading.Event, timeout_s: float = 180) -> bool:
    """True once `lvd serve` has registered the deployment; False when Ctrl-C set `stop` first."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"`lvd serve` exited with code {server.returncode}; see its log")
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(name)
                return True
            except Exception:  # noqa: BLE001 - not registered yet
                if stop.wait(1):
                    return False
    raise TimeoutError(f"deployment {name} was not served within {timeout_s:.0f} s")


def print_outputs(output: Path) -> None:
    """Where the DAG put everything (paths from its record `pipeline.json` when the run got that far)."""
    import json

    from flows.pipeline import STAGES, output_layout

    paths = output_layout(output)
    record = json.loads(paths["record"].read_text()) if paths["record"].exists() else {}
    lines = [("shards", paths["shards"]), ("manifest", paths["manifest"])]
    lines += [(f"stage {stage} checkpoint", paths[f"stage{stage}_pipeline"]) for stage in STAGES]
    lines += [("TensorBoard logs", f"{paths['train']}  (tensorboard --logdir {paths['train']})"),
              ("FVD report", paths["fvd_report"])]
    if record.get("fvd"):
        lines.append(("FVD", f"{record['fvd']['fvd']:.2f} ({record['fvd']['real_set']})"))
    lines += [("generated video", video["mp4"]) for video in record.get("videos", [])]
    lines += [("DAG summary", paths["summary"])]
    if record.get("skipped"):
        lines.append(("skipped (already done)", ", ".join(record["skipped"])))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name + ':':<{width + 1}} {value}")


def _wait_for_run(flow_run_id, stop: threading.Event):
    """Poll the run until it is final; None when Ctrl-C set `stop` first."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(2):
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state and flow_run.state.is_final():
                return flow_run
    return None


def run_demo(home: Path, output: Path, exit_after: bool) -> int:
    from prefect.deployments import run_deployment

    output = output.resolve()
    stop = threading.Event()
    with local_prefect_api(home / "prefect") as client:  # the `lvd serve` child process inherits the environment
        ui = client["PREFECT_API_URL"].removesuffix("/api")
        print(f"Prefect UI: {ui}", flush=True)
        server = start_logged([sys.executable, "-m", "flows.cli", "serve"], home / "serve.log")
        # From here Ctrl-C only sets a flag that the waits check, so the demo always gets to stop the served
        # run (its process group) and say how to continue, wherever in Prefect's polling the signal lands.
        previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            if not _wait_for_deployment(DEMO_DEPLOYMENT, server, stop):
                return 130
            print(f"running {DEMO_DEPLOYMENT} (watch it at {ui}/runs)", flush=True)
            started = time.monotonic()
            submitted = run_deployment(DEMO_DEPLOYMENT, parameters={"output_root": str(output)}, timeout=0)
            flow_run = _wait_for_run(submitted.id, stop)
            if flow_run is None:
                print("stopped; rerun to continue (finished steps are skipped, training resumes from its "
                      "last checkpoint)", flush=True)
                return 130
            state = flow_run.state
            print(f"{DEMO_DEPLOYMENT}: {state.name if state else 'unknown'} in {time.monotonic() - started:.0f} s "
                  f"({ui}/runs/flow-run/{flow_run.id})")
            print_outputs(output)
            if not exit_after:
                print("serving deployments; Ctrl-C to stop", flush=True)
                while server.poll() is None and not stop.wait(5):
                    pass
            return 0 if state and state.is_completed() else 1
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def _run(request: DemoRequest) -> int:
    return run_demo(Path(request.home), Path(request.output), request.exit_after)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "demo", DemoRequest, _run,
                        help="run the pipeline on the bundled sample clips (local Prefect + Ray)")
