"""`lvd serve`: serve every deployment of the project from one process against the configured Prefect API.

Each module in DEPLOYMENT_MODULES exposes `deployments() -> list[RunnerDeployment]`; once served,
`prefect deployment run FLOW/DEPLOYMENT --param k=v` works against that server (the UI shows each run).
With `--local`, a Prefect server on loopback (SQLite under `--home`) is started first.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

DEPLOYMENT_MODULES = [
    "flows.curate",
    "flows.train",
    "flows.generate",
    "flows.walk",
    "flows.evaluate",
    "flows.pipeline",
    "flows.study",
]


def all_deployments(flow_names: list[str] | None = None) -> list:
    """Deployments of every registered module, or only those of the named flows (e.g. ["curate-lvd"])."""
    deployments = []
    for module_name in DEPLOYMENT_MODULES:
        deployments.extend(importlib.import_module(module_name).deployments())
    if flow_names:
        deployments = [d for d in deployments if d.flow_name in flow_names]
        if not deployments:
            raise ValueError(f"no deployments for flows {flow_names}")
    return deployments


def serve_all(limit: int | None = None, flow_names: list[str] | None = None) -> None:
    """Block, serving the deployments; runs start as subprocesses of this process."""
    from prefect import serve

    serve(*all_deployments(flow_names), limit=limit)


def _run(args: argparse.Namespace) -> int:
    if args.local:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from infra.local import local_prefect_server

        with local_prefect_server(Path(args.home)) as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
            os.environ["PREFECT_API_URL"] = api_url  # flow-run subprocesses read the environment
            print(f"Prefect UI: {api_url.removesuffix('/api')}", flush=True)
            serve_all(args.limit, args.flow)
    else:
        serve_all(args.limit, args.flow)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve all deployments (curate-lvd/..., train-stage/..., ...)")
    parser.add_argument("--local", action="store_true", help="start a Prefect server on 127.0.0.1 first")
    parser.add_argument("--home", default=".lvd/prefect", help="PREFECT_HOME for --local (SQLite lives here)")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    parser.add_argument("--flow", action="append", default=None, help="serve only this flow's deployments (repeatable)")
    parser.set_defaults(func=_run)
