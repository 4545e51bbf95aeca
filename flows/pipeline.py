"""Flow `lvd-pipeline`: the whole DAG, raw clips -> LVD-F -> three training stages -> FVD -> videos.

curate-lvd -> train-stage 1 -> train-stage 2 -> train-stage 3 -> evaluate-fvd -> generate-video, each
called as a subflow (so each shows up under the parent run in the Prefect UI and stays deployable on its
own). Outputs are passed along, never copied by hand: the curate output directory is the training data,
each stage's exported pipeline initialises the next, stage 3's pipeline is what FVD and generation load.

Rerunning skips finished steps. Each subflow resumes on its own (curation by source, training via its
`done.json`, FVD by shard); on top of that the parent keeps a small ledger (`OUT/.pipeline/STEP.json`)
of what each step was run with, so that a step whose inputs are unchanged is skipped outright and a
step whose upstream changed (new sources curated, a stage retrained) is redone instead of reusing stale
results. A markdown artifact (`lvd-pipeline-summary`, also `OUT/pipeline.md`) lists every step, its
outputs and whether it ran or was skipped; `OUT/pipeline.json` holds the same as data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

# FVD protocol settings per training preset. `tiny` is a smoke test that fits a laptop: 4 videos of 16
# frames at 64x112 (the protocol's 5:9 aspect, rounded to the VAE's factor 8), 2 sampling steps. Any other
# preset uses evaluate-fvd's own defaults, i.e. the paper's protocol (docs/recipe.md §5: 13,320 videos, 320x576).
FVD_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_videos=4, batch_size=2, shard_size=4, steps=2, num_frames=16, height=64, width=112),
}
# generate-video settings per preset: `tiny` at stage 3's training resolution (96x128), 14 frames.
GENERATE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_frames=14, height=96, width=128, steps=8),
}
DEFAULT_PROMPTS = ["a cyclist riding down a city street", "a rabbit in a meadow"]
STAGES = (1, 2, 3)
REAL_SET_NOTE = ("smoke-test reference: the curated clips of this run, NOT UCF-101; the number checks that "
                 "the DAG works and is not comparable to the paper's FVD")


def output_layout(output_root: str | Path) -> dict[str, Path]:
    """Where each step writes, below `output_root` (the demo prints these)."""
    root = Path(output_root).resolve()
    layout = {
        "root": root,
        "curate": root / "curate",
        "shards": root / "curate" / "shards",
        "manifest": root / "curate" / "manifest.parquet",
        "train": root / "train",
        "fvd_real": root / "fvd-real-clips",
        "evaluate": root / "evaluate",
        "fvd_report": root / "evaluate" / "results.json",
        "generate": root / "generate",
        "summary": root / "pipeline.md",
        "record": root / "pipeline.json",
    }
    for stage in STAGES:
        layout[f"stage{stage}"] = root / "train" / f"stage{stage}"
        layout[f"stage{stage}_pipeline"] = root / "train" / f"stage{stage}" / "pipeline"
        layout[f"stage{stage}_tensorboard"] = root / "train" / f"stage{stage}" / "tensorboard"
    return layout


@dataclass(frozen=True)
class DagSteps:
    """The flows the DAG calls; the real ones by default (`default_steps`), swappable to test the wiring."""

    curate: Callable[..., dict[str, Any]]
    train: Callable[..., dict[str, Any]]
    evaluate: Callable[..., dict[str, Any]]
    generate: Callable[..., list[dict[str, Any]]]


def default_steps() -> DagSteps:
    from flows.curate import curate_lvd
    from flows.evaluate import evaluate_fvd
    from flows.generate import generate_video
    from flows.train import train_stage

    return DagSteps(curate=curate_lvd, train=train_stage, evaluate=evaluate_fvd, generate=generate_video)


# ------------------------------------------------------------------------------------------- ledger


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def listing_fingerprint(directory: str | Path) -> str:
    """Names and sizes of the files under a local folder (cheap: no content is read)."""
    root = Path(directory)
    if not root.is_dir():
        return fingerprint(str(directory))
    return fingerprint(sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()))


class Ledger:
    """One JSON record per step under OUT/.pipeline: the fingerprint of its inputs and, once done, its result."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".pipeline"

    def read(self, step: str) -> dict[str, Any] | None:
        path = self.dir / f"{step}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, step: str, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / f".{step}.json.tmp"
        partial.write_text(json.dumps(record, indent=2, default=str))
        partial.replace(self.dir / f"{step}.json")

    def finished(self, step: str, inputs: str) -> dict[str, Any] | None:
        record = self.read(step)
        if record and record.get("state") == "finished" and record.get("inputs") == inputs:
            return record
        return None


# ------------------------------------------------------------------------------------------- helpers


def check_overrides(kind: str, overrides: dict[str, Any] | None, allowed: set[str]) -> dict[str, Any]:
    """A typo in a settings dict is an error naming the key, never a silently ignored setting."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {unknown}; allowed: {sorted(allowed)}")
    return overrides


def pending_sources(input_path: str, curate_dir: Path, config: dict[str, Any]) -> list[str]:
    """Sources under `input_path` that the curate output directory has not committed yet."""
    from curation.config import CurationConfig
    from curation.dataset import completed_sources, discover_sources
    from dataformat import RunLayout

    cfg = CurationConfig.from_overrides(config)
    done = completed_sources(RunLayout(curate_dir)) if (curate_dir / "sources.parquet").exists() else set()
    return [source for source in discover_sources(input_path, cfg.video_extensions) if source not in done]


def stage_data(stage: int, curate_dir: Path) -> tuple[str, str]:
    """What a stage trains on: LVD-F, or for stage 3 the hq subset (`curate/hq/shards`) when it has clips."""
    hq = curate_dir / "hq"
    if stage == 3:
        if any((hq / "shards").glob("*.tar")):
            return str(hq), f"hq subset {hq / 'shards'}"
        return str(curate_dir), "LVD-F (no hq subset: curation's RAFT pass needs scorers.raft.weights)"
    return str(curate_dir), "LVD-F"


@task(name="export-real-clips")
def export_real_clips(shards_dir: str, target: str) -> dict[str, Any]:
    """The kept clips of a curate run as plain MP4 files (the smoke-test FVD reference set)."""
    from dataformat import read_shard_samples

    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for shard in sorted(Path(shards_dir).glob("*.tar")):
        for sample in read_shard_samples(shard):
            name = f"{sample['key']}.mp4"
            path = out / name
            if not path.exists() or path.stat().st_size != len(sample["mp4"]):
                partial = out / f".{name}.tmp"
                partial.write_bytes(sample["mp4"])
                partial.replace(path)
            written.add(name)
    for stale in out.glob("*.mp4"):
        if stale.name not in written:
            stale.unlink()
    if len(written) < 2:
        raise ValueError(f"{shards_dir}: FVD needs at least 2 curated clips, found {len(written)}; curate more "
                         "input or pass fvd_real_dir")
    return {"real_dir": str(out), "clips": len(written)}


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


def run_dag(steps: DagSteps, *, input_path: str | None, output_root: str, preset: str, num_workers: int,
            use_gpu: bool, ray_address: str | None, curate_config: dict[str, Any] | None, max_steps: int | None,
            init: str | None, fvd_real_dir: str | None, fvd: dict[str, Any] | None, prompts: list[str] | None,
            generate: dict[str, Any] | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the six steps in order, passing each step's outputs to the next; see the module docstring."""
    import inspect

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    fvd_settings = {**FVD_PRESETS.get(preset, {}), **check_overrides(
        "fvd", fvd, set(inspect.signature(steps.evaluate).parameters) - {"real_dir", "checkpoint", "output_dir"})}
    generate_settings = {**GENERATE_PRESETS.get(preset, {}), **check_overrides(
        "generate", generate, set(inspect.signature(steps.generate).parameters) - {"prompts", "checkpoint",
                                                                                   "output_dir"})}
    prompts = list(prompts or DEFAULT_PROMPTS)
    curate_config = dict(curate_config or {})
    paths = output_layout(output_root)
    paths["root"].mkdir(parents=True, exist_ok=True)
    paths["record"].unlink(missing_ok=True)  # rewritten when the DAG finishes; never a stale record
    ledger = Ledger(paths["root"])
    record: dict[str, Any] = {"output_root": str(paths["root"]), "preset": preset, "steps": []}

    def done(name: str, skipped: bool, started: float, outputs: dict[str, Any], note: str = "") -> None:
        record["steps"].append({"name": name, "skipped": skipped, "seconds": time.monotonic() - started,
                                "outputs": outputs, "note": note})
        log(f"{name}: {'skipped' if skipped else 'done'}" + (f" ({note})" if note else ""))

    # 1. curate-lvd: skipped when the same input and settings left no source to process.
    started = time.monotonic()
    if input_path is None:
        from flows.curate import default_input

        input_path = default_input()
    curate_inputs = fingerprint(str(input_path), curate_config)
    previous = ledger.finished("curate-lvd", curate_inputs)
    if previous and paths["manifest"].exists() and not pending_sources(input_path, paths["curate"], curate_config):
        curated, skipped = previous["result"], True
    else:
        ledger.write("curate-lvd", {"state": "started", "inputs": curate_inputs})
        curated = steps.curate(input_path=input_path, output_path=str(paths["curate"]), config=curate_config,
                               ray_address=ray_address)
        curated = {key: curated[key] for key in ("sources", "sources_error", "clips", "kept") if key in curated}
        ledger.write("curate-lvd", {"state": "finished", "inputs": curate_inputs, "result": curated})
        skipped = False
    data_fingerprint = fingerprint(file_fingerprint(paths["curate"] / "summary.json") or curated,
                                   file_fingerprint(paths["curate"] / "hq" / "summary.json"))
    done("curate-lvd", skipped, started, {"kept clips": f"{curated.get('kept')} of {curated.get('clips')}",
                                          "shards": paths["shards"], "manifest": paths["manifest"]})

    # 2-4. train-stage 1 -> 2 -> 3: each stage's exported pipeline initialises the next. Stage 3 (the
    # high-resolution finetune) trains on the curated `hq` subset when curation selected one (RAFT weights).
    upstream, stage_init = data_fingerprint, init
    trained: dict[str, Any] = {}
    for stage in STAGES:
        started = time.monotonic()
        name = f"train-stage{stage}"
        inputs = fingerprint(upstream, preset, max_steps, stage_init)
        previous = ledger.read(name)
        resume = not (previous and previous.get("inputs") != inputs)  # upstream changed: train again
        if not resume:
            log(f"{name}: its data or initialisation changed since the last run; training it again")
        ledger.write(name, {"state": "started", "inputs": inputs})
        data, data_note = stage_data(stage, paths["curate"])
        trained = steps.train(stage=stage, preset=preset, data=data, output_root=str(paths["train"]),
                              num_workers=num_workers, use_gpu=use_gpu, resume=resume, init=stage_init,
                              max_steps=max_steps, ray_address=ray_address)
        stage_dir = Path(trained["output_dir"])
        ledger.write(name, {"state": "finished", "inputs": inputs, "result": trained})
        losses = ", ".join(f"{key} {value:.4f}" for key, value in (trained.get("losses") or {}).items())
        done(name, bool(trained.get("skipped")), started,
             {"data": data_note, "pipeline": trained["pipeline"], "tensorboard": stage_dir / "tensorboard",
              "steps": trained.get("step"), "loss": losses or "n/a"})
        upstream = fingerprint(file_fingerprint(stage_dir / "done.json") or trained)
        stage_init = trained["pipeline"]
    checkpoint, checkpoint_fingerprint = str(trained["pipeline"]), upstream

    # 5. evaluate-fvd on stage 3's pipeline.
    started = time.monotonic()
    if fvd_real_dir:
        real_dir, real_set = fvd_real_dir, f"`{fvd_real_dir}`"
    else:
        real_dir = export_real_clips(str(paths["shards"]), str(paths["fvd_real"]))["real_dir"]
        real_set = REAL_SET_NOTE
    generation_inputs = fingerprint(checkpoint, checkpoint_fingerprint, fvd_settings)
    inputs = fingerprint(generation_inputs, real_dir, listing_fingerprint(real_dir))
    previous = ledger.finished("evaluate-fvd", inputs)
    if previous and paths["fvd_report"].exists():
        evaluated, skipped = previous["result"], True
    else:
        earlier = ledger.read("evaluate-fvd")
        if earlier and earlier.get("generation") != generation_inputs:
            # evaluate-fvd keys its shards by checkpoint *path*; a retrained checkpoint must not reuse them.
            for stale in ("shards", "videos"):
                shutil.rmtree(paths["evaluate"] / stale, ignore_errors=True)
        ledger.write("evaluate-fvd", {"state": "started", "inputs": inputs, "generation": generation_inputs})
        summary = steps.evaluate(real_dir=real_dir, checkpoint=checkpoint, output_dir=str(paths["evaluate"]),
                                 **fvd_settings)
        evaluated = {key: summary[key] for key in ("fvd", "kvd", "clipsim", "num_real", "num_fake")}
        evaluated["real_set"] = real_set
        ledger.write("evaluate-fvd", {"state": "finished", "inputs": inputs, "generation": generation_inputs,
                                      "result": evaluated})
        skipped = False
    record["fvd"] = evaluated
    done("evaluate-fvd", skipped, started, {"FVD": f"{evaluated['fvd']:.2f}", "report": paths["fvd_report"],
                                            "real set": evaluated["real_set"]})

    # 6. generate-video with stage 3's pipeline.
    started = time.monotonic()
    inputs = fingerprint(checkpoint, checkpoint_fingerprint, prompts, generate_settings)
    previous = ledger.finished("generate-video", inputs)
    if previous and all(Path(video["mp4"]).exists() for video in previous["result"]):
        videos, skipped = previous["result"], True
    else:
        ledger.write("generate-video", {"state": "started", "inputs": inputs})
        videos = steps.generate(prompts=prompts, checkpoint=checkpoint, output_dir=str(paths["generate"]),
                                **generate_settings)
        videos = [{key: video[key] for key in ("prompt", "mp4", "gif")} for video in videos]
        ledger.write("generate-video", {"state": "finished", "inputs": inputs, "result": videos})
        skipped = False
    record["videos"] = videos
    done("generate-video", skipped, started, {video["prompt"]: video["mp4"] for video in videos})

    record["checkpoints"] = {f"stage{s}": str(paths[f"stage{s}_pipeline"]) for s in STAGES}
    record["skipped"] = [step["name"] for step in record["steps"] if step["skipped"]]
    paths["record"].write_text(json.dumps(record, indent=2, default=str))
    paths["summary"].write_text(summary_markdown(record))
    return json.loads(json.dumps(record, default=str))


@flow(name="lvd-pipeline", log_prints=True)
def lvd_pipeline(
    input_path: str | None = None,
    output_root: str = "out/pipeline",
    preset: str = "tiny",
    num_workers: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
    curate_config: dict[str, Any] | None = None,
    max_steps: int | None = None,
    init: str | None = None,
    fvd_real_dir: str | None = None,
    fvd: dict[str, Any] | None = None,
    prompts: list[str] | None = None,
    generate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Raw clips -> curate-lvd -> train-stage 1, 2, 3 -> evaluate-fvd -> generate-video, as subflows.

    Args:
        input_path: folder, file or fsspec URL of raw videos; default: the bundled sample clips.
        output_root: everything goes below it (curate/, train/stageN/, evaluate/, generate/); rerun skips.
        preset: training preset (`tiny` for a laptop, `svd` for the paper's sizes); also picks FVD and
            generation settings (FVD_PRESETS / GENERATE_PRESETS; `svd`: the paper's protocol).
        num_workers, use_gpu: Ray Train workers per stage. ray_address: e.g. "ray://head:10001"
            (curation and training); default a local Ray.
        curate_config: overrides of `CurationConfig` (e.g. {"scorers": {"clip": {"pretrained": PATH}}}).
        max_steps: cut every stage to this many optimizer steps (smoke tests); init: stage I's
            initialisation (e.g. a local SD 2.1 directory); default: the preset's.
        fvd_real_dir: the real UCF-101 videos; default: the curated clips of this run, a smoke-test
            reference only (labelled as such in the report).
        fvd, generate: overrides of evaluate-fvd / generate-video parameters; prompts: for generate-video.
    """
    record = run_dag(default_steps(), input_path=input_path, output_root=output_root, preset=preset,
                     num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
                     curate_config=curate_config, max_steps=max_steps, init=init, fvd_real_dir=fvd_real_dir,
                     fvd=fvd, prompts=prompts, generate=generate, log=get_run_logger().info)
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


def _run(args: argparse.Namespace) -> int:
    from curation.config import parse_set_options

    curate_config: dict[str, Any] = {}
    for key, value in parse_set_options(args.set).items():
        curate_config[key] = {**curate_config.get(key, {}), **value} if isinstance(value, dict) else value
    record = lvd_pipeline(input_path=args.input, output_root=args.out, preset=args.preset,
                          num_workers=args.num_workers, use_gpu=args.use_gpu, ray_address=args.ray_address,
                          curate_config=curate_config, max_steps=args.max_steps, init=args.init,
                          fvd_real_dir=args.fvd_real_dir, prompts=args.prompt or None)
    print(json.dumps({"fvd": record["fvd"]["fvd"], "checkpoints": record["checkpoints"],
                      "videos": [video["mp4"] for video in record["videos"]], "skipped": record["skipped"]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="the whole DAG: curate -> train stages 1-3 -> FVD -> generate")
    parser.add_argument("input", nargs="?", default=None, help="raw videos: folder, file or fsspec URL "
                                                               "(default: bundled samples)")
    parser.add_argument("--out", default="out/pipeline", help="output root (rerunning skips finished steps)")
    parser.add_argument("--preset", default="tiny", help="training preset: tiny (CPU) or svd (the paper's sizes)")
    parser.add_argument("--max-steps", type=int, default=None, help="cut every stage to N optimizer steps")
    parser.add_argument("--init", default=None, help="stage I initialisation (e.g. a local SD 2.1 directory)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per stage")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (ray://head:10001); default local Ray")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="curation setting, e.g. --set scorers.clip.pretrained=/w/clip.bin (repeatable)")
    parser.add_argument("--fvd-real-dir", default=None, help="real UCF-101 videos (default: this run's curated "
                                                             "clips, a smoke-test reference)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt for generate-video (repeatable)")
    parser.set_defaults(func=_run)
