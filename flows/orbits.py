"""Flow `render-orbits` and `lvd orbits MESH_DIR OUT`: 3D assets -> orbit clips with cameras, in the curated format.
Orchestration only; the work is in curation/orbits.py (and common/orbits.py, the Blender renderer).

validate (assets present, OUT writable, settings match what OUT holds) -> the uncommitted assets in batches of
`assets_per_task`, one `render-batch` task each on Ray (local Ray by default, `ray_address` for a cluster; a
batch is one Blender child process; a bad asset is an error row, never a failed task), at most two batches per
CPU in flight; the driver commits each asset as its batch finishes -> `finalize` (shards + manifest) ->
markdown summary artifact (a strip of the first orbit's views inline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import flat_parameters
from curation.orbits import (
    OrbitRequest,
    commit_asset,
    finalize_orbits,
    pending_assets,
    prepare_orbit_output,
    stage_assets,
)
from dataformat import native_source, portable_source
from flows.cli import add_request_command
from infra.driver import DriverProcess, stop_with_driver
from infra.local import ray_init_kwargs, unconfigured_prefect_api_url
from infra.window import BoundedWindow


@task(name="validate-orbits")
def validate_task(request: OrbitRequest) -> int:
    assets = request.check_inputs()
    prepare_orbit_output(request)
    return assets


@task(name="render-batch", retries=2, retry_delay_seconds=5, task_run_name="render {label}")
def render_batch_task(request: OrbitRequest, relative_paths: list[str], label: str,
                      driver: dict[str, Any]) -> list[dict[str, Any]]:
    """On a Ray worker: render and stage a batch of assets (the driver commits them)."""
    stop_with_driver(DriverProcess.from_dict(driver))
    return stage_assets(request, [native_source(rel) for rel in relative_paths])


@task(name="finalize")
def finalize_task(request: OrbitRequest) -> dict[str, Any]:
    return finalize_orbits(request)


@flow(name="render-orbit-batches")
def render_batches(request: OrbitRequest, local_ray: bool = True) -> dict[str, int]:
    """Stream the uncommitted assets to Ray in batches and commit each asset as its batch finishes."""
    import ray
    from prefect.settings import PREFECT_API_URL, temporary_settings

    logger = get_run_logger()
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    from curation.listing import source_batches

    batches = source_batches(pending_assets(request), request.assets_per_task)
    numbered = ((f"batch {n}", [portable_source(rel) for rel in batch]) for n, batch in enumerate(batches, 1))
    worker_api = unconfigured_prefect_api_url() if local_ray else None
    driver = DriverProcess.current().to_dict()

    def submit(item: tuple[str, list[str]]):
        label, relative_paths = item
        with temporary_settings(updates={PREFECT_API_URL: worker_api} if worker_api else {}):
            return render_batch_task.submit(request, relative_paths, f"{label}: {relative_paths[0]}", driver)

    def first_finished(futures: list) -> int:
        references = [future.wrapped_future for future in futures]
        ready, _ = ray.wait(references, num_returns=1)
        return references.index(ready[0])

    counts = {"assets": 0, "assets_error": 0, "batches": 0}
    for (_, relative_paths), future in BoundedWindow(numbered, submit, limit, first_finished):
        for relative_path, staged in zip(relative_paths, future.result(), strict=True):
            row = commit_asset(request, native_source(relative_path), staged)
            counts["assets"] += 1
            if row["status"] == "error":
                counts["assets_error"] += 1
                logger.warning("%s: %s", row["source"], row["error"])
        counts["batches"] += 1
    return counts


def summary_markdown(summary: dict[str, Any], request: OrbitRequest) -> str:
    lines = ["# render-orbits", "", "| | |", "|---|---|",
             f"| assets | {summary['assets']} ({summary['assets_error']} errors) |",
             f"| orbits | {summary['orbits']} x {summary['views']} views at {summary['size']}x{summary['size']} |",
             f"| elevation | {request.random_elevation or request.elevation} deg, radius {request.radius}, "
             f"fov {request.fov} deg |",
             f"| shards | {', '.join(summary['shards'])} |", f"| output | `{summary['output']}` |"]
    if summary["errors"]:
        lines += ["", "**errors**", ""] + [f"- `{source}`: {error}" for source, error in summary["errors"].items()]
    return "\n".join(lines) + "\n"


@flow(name="render-orbits", log_prints=True)
@flat_parameters(OrbitRequest)
def render_orbits_flow(request: OrbitRequest) -> dict[str, Any]:
    """Render 3D assets on camera orbits (Blender) into curated-format shards with the cameras."""
    from prefect_ray import RayTaskRunner

    request = request.with_overrides(mesh_dir=str(Path(request.mesh_dir).resolve()),
                                     output_path=str(Path(request.output_path).resolve()))
    assets = validate_task(request)
    get_run_logger().info("%d assets under %s", assets, request.mesh_dir)
    kwargs = ray_init_kwargs(request.ray_address)
    runner = RayTaskRunner(address=kwargs.pop("address", None), init_kwargs=kwargs)
    render_batches.with_options(task_runner=runner)(request, local_ray=request.ray_address is None)
    summary = finalize_task(request)
    create_markdown_artifact(summary_markdown(summary, request), key="render-orbits", description="orbit renders")
    print(f"{summary['assets']} assets ({summary['assets_error']} errors), {summary['orbits']} orbits -> "
          f"{summary['output']}")
    return summary


def deployments() -> list:
    from prefect.deployments.runner import EntrypointType

    return [render_orbits_flow.to_deployment(name="local", description="Orbit renders of 3D assets (Blender).",
                                             entrypoint_type=EntrypointType.MODULE_PATH)]


def _run(request: OrbitRequest) -> int:
    summary = render_orbits_flow(**request.to_dict())
    print(json.dumps({k: summary[k] for k in ("assets", "assets_ok", "assets_error", "orbits", "shards")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "orbits", OrbitRequest, _run,
                        help="render 3D assets on camera orbits into shards (render-orbits flow)")
