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
    "flows.orbits",
    "flows.multiview",
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
    if args.allow_root:
        from common.requests import ALLOWED_ROOTS_ENV, RequestError

        roots = [Path(root).expanduser().resolve() for root in args.allow_root]
        missing = [str(root) for root in roots if not root.is_dir()]
        if missing:
            raise RequestError(f"--allow-root: no such directory: {missing[0]}")
        os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join(map(str, roots))  # the flow-run subprocesses check it
    if args.local:
        from infra.local import CLIENT_ENV_FILE, local_prefect_api

        home = Path(args.home)
        with local_prefect_api(home, auth=args.auth) as client:  # flow-run subprocesses inherit the environment
            print(f"Prefect UI: {client['PREFECT_API_URL'].removesuffix('/api')}", flush=True)
            if args.auth:
                print(f"API auth string (the UI asks for it): {home / 'api-auth'}", flush=True)
            print(f"Prefect CLI in another shell: set -a; . {home / CLIENT_ENV_FILE}; set +a", flush=True)
            serve_all(args.limit, args.flow)
    else:
        serve_all(args.limit, args.flow)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve all deployments (curate-lvd/..., train-stage/..., ...)")
    parser.add_argument("--local", action="store_true", help="start a Prefect server on 127.0.0.1 first")
    parser.add_argument("--home", default=".lvd/prefect", help="PREFECT_HOME for --local (SQLite lives here)")
    parser.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                        help="--local: the API needs the auth string kept in HOME/api-auth (mode 0600; default on)")
    parser.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                        help="runs may only read and write paths inside DIR (repeatable; default: anywhere)")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    parser.add_argument("--flow", action="append", default=None, help="serve only this flow's deployments (repeatable)")
    parser.set_defaults(func=_run)
