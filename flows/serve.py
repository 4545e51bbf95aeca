"""`lvd serve`: serve every deployment of the project from one process against the configured Prefect API.

Each module in DEPLOYMENT_MODULES exposes `deployments() -> list[RunnerDeployment]`; once served,
`prefect deployment run FLOW/DEPLOYMENT --param k=v` works against that server (the UI shows each run).
With `--local`, a Prefect server on loopback (SQLite under `--home`) is started first.
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from common.requests import ALLOWED_ROOTS_ENV, Request, RequestError, setting
from flows.cli import add_request_command

DEPLOYMENT_MODULES = [
    "flows.curate",
    "flows.train",
    "flows.generate",
    "flows.walk",
    "flows.evaluate",
    "flows.pipeline",
    "flows.orbits",
    "flows.multiview",
    "flows.study",
]


@dataclass(frozen=True)
class ServeRequest(Request):
    """`lvd serve`: which deployments, how many runs at once, and (with `local`) the Prefect server to start."""

    local: bool = setting(False, help="start a Prefect server on 127.0.0.1 first")
    home: str = setting(".lvd/prefect", path="output", help="PREFECT_HOME for --local (SQLite lives here)")
    auth: bool = setting(True, help="--local: the API needs the auth string kept in HOME/api-auth (mode 0600)")
    allow_root: tuple[str, ...] = setting((), path="dir", repeat=True,
                                          help="runs may only read and write paths inside this directory "
                                               "(repeatable; default: anywhere)")
    limit: int | None = setting(None, min=1, help="max concurrent flow runs")
    flow: tuple[str, ...] = setting((), repeat=True, help="serve only this flow's deployments (repeatable)")

    def check_inputs(self) -> None:
        """Every --flow names a served flow, and with --local HOME can be written (the server's SQLite database
        and the auth string live there): refused before any server starts."""
        if self.flow:
            all_deployments(list(self.flow))
        if self.local:
            from curation.dataset import check_output_dir

            try:
                check_output_dir(self.home)
            except RequestError as error:
                raise RequestError(f"home: {error}") from None


def all_deployments(flow_names: list[str] | None = None) -> list:
    """Deployments of every registered module, or only those of the named flows (e.g. ["curate-lvd"])."""
    deployments = []
    for module_name in DEPLOYMENT_MODULES:
        deployments.extend(importlib.import_module(module_name).deployments())
    if flow_names:
        known = sorted({d.flow_name for d in deployments})
        unknown = [name for name in flow_names if name not in known]
        if unknown:
            raise RequestError(f"flow: no deployments for {', '.join(unknown)}; known flows: {', '.join(known)}")
        deployments = [d for d in deployments if d.flow_name in flow_names]
    return deployments


def serve_all(limit: int | None = None, flow_names: list[str] | None = None) -> None:
    """Block, serving the deployments; runs start as subprocesses of this process."""
    from prefect import serve

    serve(*all_deployments(flow_names), limit=limit)


def _run(request: ServeRequest) -> int:
    if request.allow_root:  # each one an existing directory (checked when the request was built)
        roots = [Path(root).expanduser().resolve() for root in request.allow_root]
        os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join(map(str, roots))  # the flow-run subprocesses check it
    flows = list(request.flow) or None
    if request.local:
        from infra.local import CLIENT_ENV_FILE, local_prefect_api

        home = Path(request.home)
        with local_prefect_api(home, auth=request.auth) as client:  # flow-run subprocesses inherit the environment
            print(f"Prefect UI: {client['PREFECT_API_URL'].removesuffix('/api')}", flush=True)
            if request.auth:
                print(f"API auth string (the UI asks for it): {home / 'api-auth'}", flush=True)
            print(f"Prefect CLI in another shell: set -a; . {home / CLIENT_ENV_FILE}; set +a", flush=True)
            serve_all(request.limit, flows)
    else:
        serve_all(request.limit, flows)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "serve", ServeRequest, _run,
                        help="serve all deployments (curate-lvd/..., train-stage/..., ...)")
