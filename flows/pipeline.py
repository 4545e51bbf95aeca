"""Flow `lvd-pipeline`: the whole DAG, raw clips -> LVD-F -> three training stages -> FVD -> videos.

curate-lvd -> train-stage 1 -> train-stage 2 -> train-stage 3 -> evaluate-fvd -> generate-video, each
called as a subflow (so each shows up under the parent run in the Prefect UI and stays deployable on its
own). Outputs are passed along, never copied by hand: the curate output directory is the training data,
each stage's exported pipeline initialises the next, stage 3's pipeline is what FVD and generation load.

The DAG is the table `DAG` of steps; a `PipelineRequest` says what to run with. Rerunning skips finished
steps. Each subflow resumes on its own (curation by source, training via its `done.json`, FVD by shard);
on top of that the incremental-build ledger (flows/ledger.py, `OUT/.pipeline/STEP.json`) records what
each step was run with, so that a step whose inputs are unchanged is skipped outright and a step whose
upstream changed (new sources curated, a stage retrained) is redone instead of reusing stale results. A
markdown artifact (`lvd-pipeline-summary`, also `OUT/pipeline.md`) lists every step, its outputs and
whether it ran or was skipped; `OUT/pipeline.json` holds the same as data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import Request, RequestError, Settings, flat_parameters, setting
from curation.config import CurateRequest, CurationConfig
from dataformat import PipelineLayout, RunLayout, StageLayout, atomic_write, atomic_write_json
from evaluation.generated import FvdRequest
from flows.cli import add_request_command
from flows.ledger import Ledger, file_fingerprint, fingerprint, listing_fingerprint
from generation.generate import GenerateRequest
from training.request import StageRunRequest
from training.stages import FVD_PRESETS, GENERATE_PRESETS, STAGE_PRESETS

DEFAULT_PROMPTS = ("a cyclist riding down a city street", "a rabbit in a meadow")
STAGES = (1, 2, 3)
REAL_SET_NOTE = ("smoke-test reference: the curated clips of this run, NOT UCF-101; the number checks that "
                 "the DAG works and is not comparable to the paper's FVD")


def override(request_type: type, name: str) -> Any:
    """A pipeline setting that overrides `request_type`'s setting `name`: the same help and bounds (written once,
    in the step's request); None means the preset's value, or else the request's default."""
    (target,) = [f for f in dataclasses.fields(request_type) if f.name == name]
    return setting(None, help=target.metadata["help"], min=target.metadata["min"], max=target.metadata["max"],
                   choices=target.metadata.get("choices"))


@dataclass(frozen=True)
class StepOverrides(Settings):
    """Base of the pipeline's override sections (`fvd`, `generate`): each field overrides the step request's field
    of the same name on top of the preset's value; a value out of its bounds is refused naming `section.field`."""

    def given(self) -> dict[str, Any]:
        """The settings this section sets (not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class FvdOverrides(StepOverrides):
    """evaluate-fvd's settings in the pipeline (`--set fvd.steps=4`); its paths are the DAG's."""

    num_videos: int | None = override(FvdRequest, "num_videos")
    batch_size: int | None = override(FvdRequest, "batch_size")
    seed: int | None = override(FvdRequest, "seed")
    steps: int | None = override(FvdRequest, "steps")
    guidance_scale: float | None = override(FvdRequest, "guidance_scale")
    num_frames: int | None = override(FvdRequest, "num_frames")
    fps: int | None = override(FvdRequest, "fps")
    height: int | None = override(FvdRequest, "height")
    width: int | None = override(FvdRequest, "width")
    shard_size: int | None = override(FvdRequest, "shard_size")
    num_real: int | None = override(FvdRequest, "num_real")
    dtype: str | None = override(FvdRequest, "dtype")
    clip_model: str | None = override(FvdRequest, "clip_model")
    clip_pretrained: str | None = override(FvdRequest, "clip_pretrained")
    i3d_weights: str | None = override(FvdRequest, "i3d_weights")


@dataclass(frozen=True)
class GenerateOverrides(StepOverrides):
    """generate-video's settings in the pipeline (`--set generate.height=64`): text-to-video with stage 3's
    pipeline, so no image-conditioning settings; prompts are the pipeline's `prompts`, the paths the DAG's."""

    num_frames: int | None = override(GenerateRequest, "num_frames")
    height: int | None = override(GenerateRequest, "height")
    width: int | None = override(GenerateRequest, "width")
    steps: int | None = override(GenerateRequest, "steps")
    guidance: str | None = override(GenerateRequest, "guidance")
    fps: int | None = override(GenerateRequest, "fps")
    motion_bucket_id: int | None = override(GenerateRequest, "motion_bucket_id")
    decode_chunk_size: int | None = override(GenerateRequest, "decode_chunk_size")
    seed: int | None = override(GenerateRequest, "seed")
    dtype: str | None = override(GenerateRequest, "dtype")
    cpu_offload: bool | None = override(GenerateRequest, "cpu_offload")
    out_fps: float | None = override(GenerateRequest, "out_fps")


@dataclass(frozen=True)
class PipelineRequest(Request):
    """Raw clips -> curate-lvd -> train-stage 1, 2, 3 -> evaluate-fvd -> generate-video, as subflows."""

    input_path: str | None = setting(None, positional=True, path="exists",
                                     help="folder, file or fsspec URL of raw videos (default: the bundled samples)")
    output_root: str = setting("out/pipeline", flag="--out", path="output", help="everything goes below it (curate/, "
                               "train/stageN/, evaluate/, generate/); rerunning skips finished steps")
    preset: str = setting("tiny", help="training preset (tiny: CPU, svd: the paper's sizes); also picks the FVD "
                                       "and generation settings (training/stages.py FVD_PRESETS, GENERATE_PRESETS)")
    num_workers: int = setting(1, min=1, help="Ray Train workers per stage")
    use_gpu: bool = setting(False, help="one GPU per Ray Train worker")
    ray_address: str | None = setting(None, help='Ray cluster for curation and training (e.g. "ray://head:10001");'
                                                 " default: a local Ray")
    curate_config: CurationConfig = setting(default_factory=CurationConfig, help="overrides of the CurationConfig "
                                            'defaults, e.g. {"scorers": {"clip": {"pretrained": PATH}}}')
    max_steps: int | None = setting(None, min=1, help="cut every stage to this many optimizer steps")
    init: str | None = setting(None, help="stage I's initialisation (e.g. a local SD 2.1 directory); default: the "
                                          "preset's", path="input")
    fvd_real_dir: str | None = setting(None, path="dir", help="the real UCF-101 videos; default: this run's curated"
                                       " clips, a smoke-test reference only (labelled as such in the report)")
    fvd: FvdOverrides = setting(default_factory=FvdOverrides, help="evaluate-fvd's settings on top of the preset's, "
                                'e.g. {"steps": 4} (`--set fvd.steps=4`)')
    prompts: tuple[str, ...] = setting(DEFAULT_PROMPTS, flag="--prompt", repeat=True,
                                       help="prompts for generate-video (repeatable)")
    generate: GenerateOverrides = setting(default_factory=GenerateOverrides, help="generate-video's settings on "
                                          'top of the preset\'s, e.g. {"height": 64} (`--set generate.height=64`)')

    def validate(self) -> None:
        if self.preset not in STAGE_PRESETS:
            raise RequestError(f"preset must be one of {', '.join(sorted(STAGE_PRESETS))}, got {self.preset!r}")
        if not self.prompts:
            raise RequestError("prompts: give at least one prompt for generate-video")
        fvd_request(self)  # the steps' requests are checked now, not after three training stages
        generate_request(self)


def fvd_request(request: PipelineRequest) -> FvdRequest:
    """evaluate-fvd's request in the DAG: FvdRequest's defaults (the paper's protocol) < the preset's
    `FVD_PRESETS` entry < `request.fvd`; stage 3's pipeline against `fvd_real_dir` or this run's exported clips."""
    layout = PipelineLayout(request.output_root)
    preset = FVD_PRESETS.get(request.preset)
    settings = {**(dataclasses.asdict(preset) if preset else {}), **request.fvd.given()}
    return _step_request("fvd", FvdRequest, settings, real_dir=request.fvd_real_dir or str(layout.fvd_real),
                         checkpoint=str(layout.stage(STAGES[-1]).pipeline), output_dir=str(layout.evaluate.root))


def generate_request(request: PipelineRequest) -> GenerateRequest:
    """generate-video's request in the DAG: GenerateRequest's defaults < the preset's `GENERATE_PRESETS` entry <
    `request.generate`; the pipeline's prompts with stage 3's pipeline."""
    layout = PipelineLayout(request.output_root)
    preset = GENERATE_PRESETS.get(request.preset)
    settings = {**(dataclasses.asdict(preset) if preset else {}), **request.generate.given()}
    return _step_request("generate", GenerateRequest, settings, prompts=list(request.prompts),
                         checkpoint=str(layout.stage(STAGES[-1]).pipeline), output_dir=str(layout.generate))


def _step_request(section: str, request_type: type, settings: dict[str, Any], **paths: Any) -> Any:
    try:
        return request_type(**settings, **paths)
    except RequestError as error:  # a check across settings (dtype, guidance, I3D's frames): name the section
        raise RequestError(f"{section}: {error}") from None


def output_layout(output_root: str | Path) -> dict[str, Path]:
    """Where each step writes, below `output_root` (the demo prints these): `PipelineLayout`'s paths by name."""
    layout = PipelineLayout(output_root)
    paths = {
        "root": layout.root,
        "curate": layout.curate.out,
        "shards": layout.curate.shards,
        "manifest": layout.curate.manifest,
        "train": layout.train,
        "fvd_real": layout.fvd_real,
        "evaluate": layout.evaluate.root,
        "fvd_report": layout.evaluate.results,
        "generate": layout.generate,
        "summary": layout.summary,
        "record": layout.record,
    }
    for stage in STAGES:
        paths[f"stage{stage}"] = layout.stage(stage).root
        paths[f"stage{stage}_pipeline"] = layout.stage(stage).pipeline
        paths[f"stage{stage}_tensorboard"] = layout.stage(stage).tensorboard
    return paths


@dataclass(frozen=True)
class DagSteps:
    """The flows the DAG calls; the real ones by default (`default_steps`), swappable to test the wiring.
    Each takes its frozen request; the real ones hand its fields to the subflow's flat parameters, once."""

    curate: Callable[[CurateRequest], dict[str, Any]]
    train: Callable[[StageRunRequest], dict[str, Any]]
    evaluate: Callable[[FvdRequest], dict[str, Any]]
    generate: Callable[[GenerateRequest], list[dict[str, Any]]]


def default_steps() -> DagSteps:
    from flows.curate import curate_lvd
    from flows.evaluate import evaluate_fvd
    from flows.generate import generate_video
    from flows.train import train_stage

    return DagSteps(curate=lambda request: curate_lvd(**request.to_dict()),
                    train=lambda request: train_stage(**request.to_dict()),
                    evaluate=lambda request: evaluate_fvd(**request.to_dict()),
                    generate=lambda request: generate_video(**request.to_dict()))


def has_pending_sources(input_path: str, curate_dir: Path, config: CurationConfig) -> bool:
    """Whether `input_path` holds a source the curate output directory has not committed yet (stops at the
    first one: the listing streams)."""
    from curation.listing import iter_sources, pending_sources
    from dataformat import RunLayout

    return next(pending_sources(RunLayout(curate_dir), iter_sources(input_path, config.video_extensions)),
                None) is not None


def stage_data(stage: int, curate_dir: Path) -> tuple[str, str]:
    """What a stage trains on: LVD-F, or for stage 3 the hq subset (`curate/hq/shards`) when it has clips."""
    curated = RunLayout(curate_dir)
    if stage == 3:
        if any(curated.hq_shards.glob("*.tar")):
            return str(curated.hq), f"hq subset {curated.hq_shards}"
        return str(curate_dir), "LVD-F (no hq subset: curation's RAFT pass needs scorers.raft.weights)"
    return str(curate_dir), "LVD-F"


@task(name="export-real-clips")
def export_real_clips(shards_dir: str, target: str) -> dict[str, Any]:
    """The kept clips of a curate run as plain MP4 files (the smoke-test FVD reference set)."""
    from dataformat.export import export_clips

    clips = export_clips(shards_dir, target)
    if len(clips) < 2:
        raise RequestError(f"{shards_dir}: FVD needs at least 2 curated clips, found {len(clips)}; curate more "
                           "input or pass fvd_real_dir")
    return {"real_dir": str(Path(target)), "clips": len(clips)}


def summary_markdown(record: dict[str, Any]) -> str:
    lines = ["# lvd-pipeline", "", f"output root: `{record['output_root']}` (preset `{record['preset']}`)", "",
             "| step | ran / skipped | seconds | outputs |", "|---|---|---|---|"]
    for step in record["steps"]:
        outputs = "<br>".join(f"{key}: `{value}`" for key, value in step["outputs"].items())
        status = "skipped" if step["skipped"] else "ran"
        if step.get("note"):
            status += f" ({step['note']})"
        lines.append(f"| {step['name']} | {status} | {step['seconds']:.1f} | {outputs} |")
    fvd = record.get("fvd")
    if fvd is not None:
        lines += ["", f"**FVD {fvd['fvd']:.2f}** (KVD {fvd['kvd']:.4f}) over {fvd['num_fake']} generated and "
                  f"{fvd['num_real']} real videos; real set: {fvd['real_set']}."]
    lines += ["", "Inspect with your own tools: `webdataset` for the shards, DuckDB/pyarrow for the manifest, "
              "`TextToVideoPipeline.from_pretrained` (diffusers) for a stage's `pipeline/`, "
              f"`tensorboard --logdir {record['output_root']}/train` for the training logs."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the DAG


@dataclass
class DagRun:
    """What the steps share: the request, where things go, the ledger, the evaluate and generate steps' requests
    (built once, `fvd_request` / `generate_request`), and what upstream steps produced."""

    request: PipelineRequest
    steps: DagSteps
    paths: dict[str, Path]
    ledger: Ledger
    fvd: FvdRequest
    generate: GenerateRequest
    upstream: str = ""  # fingerprint of the last step's output: what the next step depends on
    checkpoint: str | None = None  # the newest stage's exported pipeline
    state: dict[str, Any] = field(default_factory=dict)  # record entries: "fvd", "videos"


@dataclass(frozen=True)
class StepOutcome:
    skipped: bool
    outputs: dict[str, Any]
    note: str = ""


def curate_step(run: DagRun) -> StepOutcome:
    """curate-lvd; skipped when the same input and settings left no source to process."""
    request, paths = run.request, run.paths
    curate = CurateRequest(input_path=request.input_path or _default_input(), output_path=str(paths["curate"]),
                           config=request.curate_config, ray_address=request.ray_address)
    config = curate.to_dict()["config"]
    curated, skipped = run.ledger.run(
        "curate-lvd", fingerprint(curate.input_path, config),
        lambda: {key: value for key, value in run.steps.curate(curate).items()
                 if key in ("sources", "sources_error", "clips", "kept")},
        reusable=lambda _: paths["manifest"].exists() and not has_pending_sources(curate.input_path,
                                                                                  paths["curate"], curate.config))
    curate_layout = RunLayout(paths["curate"])
    run.upstream = fingerprint(file_fingerprint(curate_layout.summary) or curated,
                               file_fingerprint(curate_layout.hq_summary))
    return StepOutcome(skipped, {"kept clips": f"{curated.get('kept')} of {curated.get('clips')}",
                                 "shards": paths["shards"], "manifest": paths["manifest"]})


def train_step(stage: int, run: DagRun) -> StepOutcome:
    """train-stage N on the curated data, from stage N-1's pipeline. Always called (it skips itself via its
    done.json); told to start over when its data or initialisation changed since the ledger's record.
    Stage 3 (the high-resolution finetune) trains on the curated `hq` subset when curation selected one."""
    request, name = run.request, f"train-stage{stage}"
    init = request.init if stage == 1 else run.checkpoint
    inputs = fingerprint(run.upstream, request.preset, request.max_steps, init)
    resume = not run.ledger.changed(name, inputs)
    data, data_note = stage_data(stage, run.paths["curate"])
    stage_request = StageRunRequest(stage=stage, preset=request.preset, data=data,
                                    output_root=str(run.paths["train"]), num_workers=request.num_workers,
                                    use_gpu=request.use_gpu, resume=resume, init=init, max_steps=request.max_steps,
                                    ray_address=request.ray_address)
    trained, _ = run.ledger.run(name, inputs, lambda: run.steps.train(stage_request), reusable=lambda _: False)
    stage_layout = StageLayout(trained["output_dir"])
    run.upstream = fingerprint(file_fingerprint(stage_layout.done) or trained)
    run.checkpoint = trained["pipeline"]
    losses = ", ".join(f"{key} {value:.4f}" for key, value in (trained.get("losses") or {}).items())
    return StepOutcome(bool(trained.get("skipped")), {
        "data": data_note, "pipeline": trained["pipeline"], "tensorboard": stage_layout.tensorboard,
        "steps": trained.get("step"), "loss": losses or "n/a"},
        note="" if resume else "its data or initialisation changed since the last run; trained again")


def evaluate_step(run: DagRun) -> StepOutcome:
    """evaluate-fvd on the last stage's pipeline, against `fvd_real_dir` or this run's curated clips."""
    paths, request = run.paths, run.fvd
    if run.request.fvd_real_dir:
        real_set = f"`{run.request.fvd_real_dir}`"
    else:
        export_real_clips(str(paths["shards"]), request.real_dir)
        real_set = REAL_SET_NOTE
    real_dir = request.real_dir
    # what the generated videos depend on: the trained pipeline and the request's settings (not the real folder)
    generation = fingerprint(run.upstream, {**request.to_dict(), "real_dir": None})

    def drop_stale_videos(previous: dict[str, Any] | None) -> None:
        # evaluate-fvd keys its shards by checkpoint *path*; a retrained checkpoint must not reuse them.
        if previous and previous.get("generation") != generation:
            PipelineLayout(paths["root"]).drop_fvd_videos()

    def evaluate() -> dict[str, Any]:
        summary = run.steps.evaluate(request)
        return {**{key: summary[key] for key in ("fvd", "kvd", "clipsim", "num_real", "num_fake")},
                "real_set": real_set}

    evaluated, skipped = run.ledger.run(
        "evaluate-fvd", fingerprint(generation, real_dir, listing_fingerprint(real_dir)), evaluate,
        reusable=lambda _: paths["fvd_report"].exists(), before=drop_stale_videos, generation=generation)
    run.state["fvd"] = evaluated
    return StepOutcome(skipped, {"FVD": f"{evaluated['fvd']:.2f}", "report": paths["fvd_report"],
                                 "real set": evaluated["real_set"]})


def generate_step(run: DagRun) -> StepOutcome:
    """generate-video with the last stage's pipeline."""
    request = run.generate

    def generate() -> list[dict[str, Any]]:
        videos = run.steps.generate(request)
        return [{key: video[key] for key in ("prompt", "mp4", "gif")} for video in videos]

    videos, skipped = run.ledger.run(
        "generate-video", fingerprint(run.upstream, request.to_dict()), generate,
        reusable=lambda result: all(Path(video["mp4"]).exists() for video in result))
    run.state["videos"] = videos
    return StepOutcome(skipped, {video["prompt"]: video["mp4"] for video in videos})


# The DAG: each step's outputs feed the next (DagRun.upstream / .checkpoint), in this order.
DAG: tuple[tuple[str, Callable[[DagRun], StepOutcome]], ...] = (
    ("curate-lvd", curate_step),
    *((f"train-stage{stage}", lambda run, stage=stage: train_step(stage, run)) for stage in STAGES),
    ("evaluate-fvd", evaluate_step),
    ("generate-video", generate_step),
)


def run_dag(steps: DagSteps, request: PipelineRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the DAG's steps in order, passing each step's outputs to the next; see the module docstring."""
    paths = output_layout(request.output_root)
    run = DagRun(request, steps, paths, Ledger(paths["root"]), fvd_request(request), generate_request(request))
    PipelineLayout(request.output_root).prepare()
    record: dict[str, Any] = {"output_root": str(paths["root"]), "preset": request.preset, "steps": []}
    for name, step in DAG:
        started = time.monotonic()
        outcome = step(run)
        record["steps"].append({"name": name, "skipped": outcome.skipped, "seconds": time.monotonic() - started,
                                "outputs": outcome.outputs, "note": outcome.note})
        log(f"{name}: {'skipped' if outcome.skipped else 'done'}" + (f" ({outcome.note})" if outcome.note else ""))
    record.update(run.state)
    record["checkpoints"] = {f"stage{s}": str(paths[f"stage{s}_pipeline"]) for s in STAGES}
    record["skipped"] = [step["name"] for step in record["steps"] if step["skipped"]]
    atomic_write_json(paths["record"], record)
    atomic_write(paths["summary"], summary_markdown(record))
    return json.loads(json.dumps(record, default=str))


def _default_input() -> str:
    from flows.curate import default_input

    return default_input()


@flow(name="lvd-pipeline", log_prints=True)
@flat_parameters(PipelineRequest)
def lvd_pipeline(request: PipelineRequest) -> dict[str, Any]:
    """Raw clips -> curate-lvd -> train-stage 1, 2, 3 -> evaluate-fvd -> generate-video, as subflows."""
    record = run_dag(default_steps(), request, log=get_run_logger().info)
    create_markdown_artifact(summary_markdown(record), key="lvd-pipeline-summary",
                             description="lvd-pipeline: every step's outputs, ran or skipped")
    return record


def deployments() -> list:
    return [
        lvd_pipeline.to_deployment(
            name="local",
            description="The whole DAG on this machine: curate -> train 1/2/3 -> FVD -> generate (tiny preset).",
            parameters={"output_root": str(Path("out/pipeline").resolve())},
        )
    ]


# ------------------------------------------------------------------------------------------------ CLI


def _run(request: PipelineRequest) -> int:
    record = lvd_pipeline(**request.to_dict())
    print(json.dumps({"fvd": record["fvd"]["fvd"], "checkpoints": record["checkpoints"],
                      "videos": [video["mp4"] for video in record["videos"]], "skipped": record["skipped"]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "pipeline", PipelineRequest, _run, settings="",
                        help="the whole DAG: curate -> train stages 1-3 -> FVD -> generate")
