"""`lvd study create / serve / results` and the `evaluate-preference` flow: human preference studies.

Orchestration only: pairing and transcoding are `evaluation.preference.study`, the votes
`evaluation.preference.store`, the rating app `evaluation.preference.server`, the statistics
`evaluation.preference.results`; the files are `dataformat.preference`. The flow creates the study (or reopens
the one in `output_dir`, keeping its votes), serves the rating page while it counts the votes, and once every
pair has `votes_per_pair` raters (or `max_wait_minutes` have passed) stops serving and publishes the results as a
markdown artifact with the plot inline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import RequestError, flat_parameters
from dataformat.preference import read_study
from evaluation.preference.request import (
    PreferenceFlowRequest,
    StudyCreateRequest,
    StudyResultsCommand,
    StudyResultsRequest,
    StudyServeRequest,
)
from flows.cli import add_command_group, add_request_command
from flows.markdown import inline_image


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_markdown(summary: dict[str, Any], plot_path: str) -> str:
    """The artifact: per axis the pairwise table, the Bradley-Terry table (3+ systems), agreement; raters; plot."""
    percent = round(summary["confidence"] * 100)
    lines = ["# evaluate-preference", "", f"study: `{summary['study']}` · systems: {', '.join(summary['systems'])} · "
             f"{summary['votes']} votes counted · paired by {summary['pairing']}", ""]
    for axis, result in summary["by_axis"].items():
        agreement = result["agreement"]
        lines += [f"## {axis}", "", f"| first | second | votes | first wins | second wins | ties | first's win rate | "
                  f"{percent} % interval |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {row['system_a']} | {row['system_b']} | {row['votes']} | {row['wins_a']} | {row['wins_b']} | "
                  f"{row['ties']} | {_fmt(row['win_rate'])} | {_fmt(row['low'])} - {_fmt(row['high'])} |"
                  for row in result["pairs"]]
        if result["scores"]:
            lines += ["", f"| system | Bradley-Terry log-strength | {percent} % bootstrap interval | votes |",
                      "|---|---|---|---|"]
            lines += [f"| {row['system']} | {row['score']:+.3f} | {row['low']:+.3f} - {row['high']:+.3f} | "
                      f"{row['votes']} |" for row in sorted(result["scores"], key=lambda row: -row["score"])]
        lines += ["", f"Krippendorff's alpha (nominal): {_fmt(agreement['alpha'])} over {agreement['units']} pairs "
                      f"judged by two or more of {agreement['raters']} raters.", ""]
    lines += ["## raters", "", "| rater | votes | gold accuracy | counted |", "|---|---|---|---|"]
    lines += [f"| {row['rater']} | {row['votes']} | {_fmt(row['gold_accuracy'], 2)} ({row['gold_correct']}/"
              f"{row['gold_votes']}) | {'yes' if row['kept'] else 'no'} |" for row in summary["raters"]]
    lines += ["", inline_image(plot_path, "results")]
    return "\n".join(lines) + "\n"


@task(name="validate-study")
def validate_task(request: PreferenceFlowRequest) -> None:
    request.check_inputs()


@task(name="create-study")
def create_task(request: PreferenceFlowRequest) -> dict[str, Any]:
    """A new study, or the existing one in `output_dir` with its votes."""
    from evaluation.preference.study import create_study

    if request.layout.study.exists():
        manifest, _ = read_study(request.layout)
        get_run_logger().info("reopening the study in %s (its votes are kept)", request.output_dir)
    else:
        manifest = create_study(request, progress=get_run_logger().info)
    return {"systems": manifest.systems, "axes": manifest.axes, "items": manifest.items, "gold": manifest.gold}


@task(name="collect-votes")
def collect_task(request: PreferenceFlowRequest) -> dict[str, Any]:
    """Serve the rating page until enough votes are in (`wait_for_votes`), then stop serving."""
    from evaluation.preference.server import StudyServer
    from evaluation.preference.store import wait_for_votes

    logger = get_run_logger()
    server = StudyServer(request).start()
    logger.info("rating page: %s", server.url)
    try:
        return wait_for_votes(request, lambda ready, total: logger.info(
            "%d of %d pairs have %d raters on every axis", ready, total, request.votes_per_pair))
    finally:
        server.stop()


@task(name="study-results")
def results_task(request: StudyResultsRequest) -> dict[str, Any]:
    from evaluation.preference.results import compute_results

    return compute_results(request)


@flow(name="evaluate-preference", log_prints=True)
@flat_parameters(PreferenceFlowRequest)
def evaluate_preference(request: PreferenceFlowRequest) -> dict[str, Any]:
    """Human preference study of generation runs (e.g. two checkpoints on the same prompts or images).

    `systems`: NAME=DIR items, each a folder of generated videos (the generate-video flow's, whose records say
    which prompt, image and seed made each video; otherwise videos match by file name). Serves the rating page
    on `host`:`port` until every pair has `votes_per_pair` raters on every axis or `max_wait_minutes` pass,
    then writes the results under `output_dir`/results and publishes them with a plot.
    """
    validate_task(request)
    created = create_task(request)
    collected = collect_task(request)
    summary = results_task(request)
    create_markdown_artifact(results_markdown(summary, str(request.layout.plot)), key="evaluate-preference",
                             description="human preference study")
    if not collected["complete"]:
        get_run_logger().warning("reported after %.0f s with %d of %d pairs fully judged", collected["waited_s"],
                                 collected["ready_pairs"], collected["pairs"])
    return {**summary, "collection": collected, "study_items": created["items"]}


def deployments() -> list:
    return [evaluate_preference.to_deployment(name="local", description="Human preference study of generation runs.")]


# ------------------------------------------------------------------------------------------------ CLI


@contextlib.contextmanager
def _one_line_errors():
    """A damaged study file or vote log ends the command with one line (exit 2), like any bad input."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, RequestError):
            raise
        raise RequestError(str(error)) from None


def _run_create(request: StudyCreateRequest) -> int:
    from evaluation.preference.study import create_study

    with _one_line_errors():
        manifest = create_study(request)
        _, pairs = read_study(request.layout)
    print(json.dumps({"study": request.output_dir, "systems": manifest.systems, "axes": manifest.axes,
                      "pairing": manifest.pairing, "items": manifest.items, "pairs": len(pairs), "gold": manifest.gold,
                      "unmatched": manifest.unmatched}))
    return 0


def _run_serve(request: StudyServeRequest) -> int:
    from evaluation.preference.server import serve_study

    with _one_line_errors():
        serve_study(request, announce=lambda line: print(line, flush=True))
    return 0


def _run_results(request: StudyResultsCommand) -> int:
    from evaluation.preference.results import compute_results

    with _one_line_errors():
        summary = compute_results(request)
    if request.print_json:
        print(json.dumps(summary))
        return 0
    for axis, result in summary["by_axis"].items():
        print(f"{axis}:")
        for row in result["pairs"]:
            print(f"  {row['system_a']} vs {row['system_b']}: {row['votes']} votes, {row['system_a']} wins "
                  f"{_fmt(row['win_rate'])} [{_fmt(row['low'])}, {_fmt(row['high'])}]")
        for row in sorted(result["scores"], key=lambda row: -row["score"]):
            print(f"  {row['system']}: Bradley-Terry {row['score']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]")
        print(f"  agreement (Krippendorff's alpha): {_fmt(result['agreement']['alpha'])}")
    if summary["dropped_raters"]:
        print(f"dropped raters (gold accuracy below {summary['min_gold_accuracy']}): "
              f"{', '.join(summary['dropped_raters'])}")
    print(f"written to {request.layout.results}")
    return 0


def _run_flow(request: PreferenceFlowRequest) -> int:
    summary = evaluate_preference(**request.to_dict())
    print(json.dumps({"study": summary["study"], "votes": summary["votes"], "collection": summary["collection"]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    study = add_command_group(subparsers, "study", help="human preference studies: create, serve, results")
    add_request_command(study, "create", StudyCreateRequest, _run_create,
                        help="pair the videos of two or more systems into a study (transcoded to VP9 WebM)")
    add_request_command(study, "serve", StudyServeRequest, _run_serve,
                        help="serve the rating page (loopback by default; a token elsewhere)")
    add_request_command(study, "results", StudyResultsCommand, _run_results,
                        help="win rates, Bradley-Terry scores, agreement and rater screening of the votes so far")
    add_request_command(subparsers, "evaluate-preference", PreferenceFlowRequest, _run_flow,
                        help="create, serve and report a human preference study (the flow)")
