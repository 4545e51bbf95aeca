"""What curating LVD (and LVD-10M) costs: CPU core-hours, GPU-hours, shard storage, Prefect task runs and wall
time on a KubeRay shape, from per-frame and per-clip costs measured here with the project's own code.

    python benchmarks/cost_model.py                      # measure on the sample footage, then estimate
    python benchmarks/cost_model.py --measured FILE.json # re-estimate from an earlier run's measurements
        [--cpu-workers 64 --cores-per-cpu-worker 32 --gpu-workers 32 --gpus-per-gpu-worker 8]
        [--sources-per-task-run 1000 --clips-per-source 1 --video-mbit-s 2.0 --json out/cost_model.json]
        [--decode-threads 1]                              # decode.threads while measuring (a 1-CPU Ray task's)

Two parts. `estimate(CostInputs) -> CostEstimate` is the model: pure arithmetic, unit-tested on a
hand-computed case (tests/test_cost_model.py). The measurement (`measure`, run only by this script) times the
real code paths of curation/ on the bundled sample footage, in CPU seconds of this process (all its threads:
decoder, clip encoder and spool workers), with decode.threads 1 unless told otherwise:
decode, the small analysis copy (decode.analysis_width), the cut cascade, Farneback motion, the scorer-frame
spool, clip writing, the PP-OCR text detector (real weights, shipped with rapidocr), and CLIP ViT-L/14, CoCa
ViT-L/14 and RAFT-large with random weights (real architectures: real weights are not available offline; the
compute is the same). It also counts their floating-point operations per clip (torch's per-operator FLOP
formulas). GPU seconds are not measured: no GPU was available. They are the counted FLOPs divided by a stated
GPU peak and a stated utilisation, both printed as assumptions with their source; replace them with a GPU
run's figures when you have one (the JSON holds every input).

The curation has two phases that cannot overlap: (1) every clip is decoded, cut, written and scored (CPU work
streams into the GPU scorer pools, so the two groups overlap and the slower sets the pace), then the filters
rank the whole set; (2) the kept clips get RAFT motion for the stage III subset (clip files decoded on CPU,
RAFT on GPU). Wall time per phase = max(CPU core-seconds / CPU cores, GPU-seconds / GPUs), the CPU cores being
the cpu-decode group's plus the gpu pods' spare ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PHASE_CURATE = "curate"  # every clip: decode, cuts, clips, scorers
PHASE_HQ = "hq"  # kept clips only: RAFT for the stage III subset
CPU_PER = {"frame": PHASE_CURATE, "clip": PHASE_CURATE, "kept_frame": PHASE_HQ}
GPU_PER = {"clip": PHASE_CURATE, "kept_clip": PHASE_HQ}


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Dataset:
    """Clip counts and lengths of a dataset to curate (figures from docs/recipe.md §1)."""

    name: str
    clips: float  # clips going in
    kept_clips: float  # clips the filters keep
    mean_clip_s: float
    fps: float  # frames per second of the sources


@dataclass(frozen=True)
class CpuCost:
    """Core-seconds of one step per unit: per source `frame`, per `clip`, or per frame of a kept clip."""

    name: str
    core_s: float
    per: str  # "frame" | "clip" | "kept_frame"
    source: str = "measured"


@dataclass(frozen=True)
class GpuCost:
    """One GPU scorer: FLOPs per unit (every `clip` or every `kept_clip`) and the share of the GPU's peak
    it reaches. GPU seconds per unit = flops / (peak * utilisation)."""

    name: str
    flops: float
    utilisation: float
    per: str  # "clip" | "kept_clip"
    source: str = "FLOPs counted here; utilisation assumed"


@dataclass(frozen=True)
class ClusterShape:
    """A KubeRay RayCluster (infra/ray/kuberay-raycluster.yaml): `cpu-decode` and `gpu` worker groups."""

    cpu_workers: int
    cores_per_cpu_worker: int
    gpu_workers: int
    gpus_per_gpu_worker: int
    gpu_name: str
    gpu_peak_flops: float  # dense bf16 peak of one GPU
    spare_cores_per_gpu_worker: int = 0  # CPUs of a gpu pod that Ray gives to CPU work (decode tasks)

    @property
    def cores(self) -> int:
        """Cores doing the CPU work: the cpu-decode group's and the gpu pods' spare ones."""
        return self.cpu_workers * self.cores_per_cpu_worker + self.gpu_workers * self.spare_cores_per_gpu_worker

    @property
    def gpus(self) -> int:
        return self.gpu_workers * self.gpus_per_gpu_worker


@dataclass(frozen=True)
class CostInputs:
    dataset: Dataset
    cpu: tuple[CpuCost, ...]
    gpu: tuple[GpuCost, ...]
    cluster: ClusterShape
    video_bytes_per_s: float  # clip files keep the source's bitrate (stream copy)
    sample_overhead_bytes: float  # per shard sample: tar headers, the JSON row, the caption
    clips_per_source: float  # clips one source video yields
    sources_per_task_run: int  # sources one Prefect task run curates
    # How clips are cut (docs/exact-clips.md): clip file bytes per byte of the shot at the source's bitrate
    # (exact copies carry their pre-/post-roll, re-encodes their own bitrate), and the CPU seconds a training
    # read decodes per shown frame of a kept clip (exact copies decode their roll too).
    clip_bytes_factor: float = 1.0
    read_core_s_per_frame: float = 0.0


@dataclass
class PhaseEstimate:
    cpu_core_hours: float
    gpu_hours: float
    cpu_wall_hours: float  # on the cluster's cpu-decode cores
    gpu_wall_hours: float  # on the cluster's GPUs
    wall_hours: float
    bottleneck: str  # "cpu-decode" or "gpu"
    cores_per_gpu_balanced: float  # CPU cores per GPU at which CPU and GPU work finish together


@dataclass
class CostEstimate:
    dataset: str
    frames: float
    video_hours: float
    cpu_core_hours: dict[str, float]  # per step
    gpu_hours: dict[str, float]  # per scorer
    gpu_seconds_per_unit: dict[str, float]
    phases: dict[str, PhaseEstimate]
    total_cpu_core_hours: float
    total_gpu_hours: float
    wall_hours: float
    bottleneck: str  # the group that sets the pace of the longer phase
    input_bytes: float
    shard_bytes: float
    sources: int
    read_core_hours_per_epoch: float  # decoding every kept clip once at training time
    task_runs: int
    task_runs_unbatched: int
    cpu_workers_balanced: int  # cpu-decode replicas for the curate phase's CPU work to keep pace with the GPUs
    gpu_workers_balanced: int  # gpu replicas the curate phase keeps busy with the given cpu-decode group
    notes: list[str] = field(default_factory=list)


def _phase(cpu_core_s: float, gpu_s: float, cluster: ClusterShape) -> PhaseEstimate:
    cpu_wall = cpu_core_s / cluster.cores / 3600 if cluster.cores else math.inf
    gpu_wall = gpu_s / cluster.gpus / 3600 if cluster.gpus else (math.inf if gpu_s else 0.0)
    return PhaseEstimate(
        cpu_core_hours=cpu_core_s / 3600,
        gpu_hours=gpu_s / 3600,
        cpu_wall_hours=cpu_wall,
        gpu_wall_hours=gpu_wall,
        wall_hours=max(cpu_wall, gpu_wall),
        bottleneck="cpu-decode" if cpu_wall >= gpu_wall else "gpu",
        cores_per_gpu_balanced=cpu_core_s / gpu_s if gpu_s else math.inf,
    )


def _gpu_workers_balanced(cores_per_gpu: float, cluster: ClusterShape) -> int:
    """gpu replicas G with (cpu cores + G * spare) / (G * gpus per worker) = cores_per_gpu: the GPUs the
    cpu-decode group (plus the gpu pods' own spare cores) can keep busy."""
    per_worker = cores_per_gpu * cluster.gpus_per_gpu_worker - cluster.spare_cores_per_gpu_worker
    if not math.isfinite(cores_per_gpu) or per_worker <= 0:
        return cluster.gpu_workers  # the gpu pods' spare cores alone outpace their GPUs
    return math.ceil(cluster.cpu_workers * cluster.cores_per_cpu_worker / per_worker)


def estimate(inputs: CostInputs) -> CostEstimate:
    """The cost of curating `inputs.dataset` on `inputs.cluster` (pure arithmetic; see the module doc)."""
    data, cluster = inputs.dataset, inputs.cluster
    if data.clips <= 0 or not 0 <= data.kept_clips <= data.clips or data.mean_clip_s <= 0 or data.fps <= 0:
        raise ValueError(f"dataset {data.name!r}: need clips > 0, 0 <= kept_clips <= clips, mean_clip_s > 0, fps > 0")
    if inputs.clips_per_source <= 0 or inputs.sources_per_task_run < 1:
        raise ValueError("need clips_per_source > 0 and sources_per_task_run >= 1")
    if inputs.clip_bytes_factor <= 0 or inputs.read_core_s_per_frame < 0:
        raise ValueError("need clip_bytes_factor > 0 and read_core_s_per_frame >= 0")
    frames_per_clip = data.mean_clip_s * data.fps
    units = {
        "frame": data.clips * frames_per_clip,
        "clip": data.clips,
        "kept_frame": data.kept_clips * frames_per_clip,
        "kept_clip": data.kept_clips,
    }
    cpu_core_s: dict[str, float] = {}
    phase_cpu = dict.fromkeys((PHASE_CURATE, PHASE_HQ), 0.0)
    for item in inputs.cpu:
        if item.per not in CPU_PER:
            raise ValueError(f"CPU cost {item.name!r}: per must be one of {sorted(CPU_PER)}, got {item.per!r}")
        seconds = units[item.per] * item.core_s
        cpu_core_s[item.name] = cpu_core_s.get(item.name, 0.0) + seconds
        phase_cpu[CPU_PER[item.per]] += seconds
    gpu_s: dict[str, float] = {}
    per_unit: dict[str, float] = {}
    phase_gpu = dict.fromkeys((PHASE_CURATE, PHASE_HQ), 0.0)
    for item in inputs.gpu:
        if item.per not in GPU_PER:
            raise ValueError(f"GPU cost {item.name!r}: per must be one of {sorted(GPU_PER)}, got {item.per!r}")
        if not 0 < item.utilisation <= 1:
            raise ValueError(f"GPU cost {item.name!r}: utilisation must be in (0, 1], got {item.utilisation}")
        per_unit[item.name] = item.flops / (cluster.gpu_peak_flops * item.utilisation)
        seconds = units[item.per] * per_unit[item.name]
        gpu_s[item.name] = gpu_s.get(item.name, 0.0) + seconds
        phase_gpu[GPU_PER[item.per]] += seconds
    phases = {name: _phase(phase_cpu[name], phase_gpu[name], cluster) for name in (PHASE_CURATE, PHASE_HQ)}
    longest = max(phases.values(), key=lambda phase: phase.wall_hours)
    curate = phases[PHASE_CURATE]
    spare_cores = cluster.gpu_workers * cluster.spare_cores_per_gpu_worker
    balanced_cores = curate.cores_per_gpu_balanced * cluster.gpus - spare_cores
    sources = math.ceil(data.clips / inputs.clips_per_source)
    return CostEstimate(
        dataset=data.name,
        frames=units["frame"],
        video_hours=data.clips * data.mean_clip_s / 3600,
        cpu_core_hours={name: seconds / 3600 for name, seconds in cpu_core_s.items()},
        gpu_hours={name: seconds / 3600 for name, seconds in gpu_s.items()},
        gpu_seconds_per_unit=per_unit,
        phases=phases,
        total_cpu_core_hours=sum(cpu_core_s.values()) / 3600,
        total_gpu_hours=sum(gpu_s.values()) / 3600,
        wall_hours=sum(phase.wall_hours for phase in phases.values()),
        bottleneck=longest.bottleneck,
        input_bytes=data.clips * data.mean_clip_s * inputs.video_bytes_per_s,
        shard_bytes=data.kept_clips * (data.mean_clip_s * inputs.video_bytes_per_s * inputs.clip_bytes_factor
                                       + inputs.sample_overhead_bytes),
        sources=sources,
        read_core_hours_per_epoch=units["kept_frame"] * inputs.read_core_s_per_frame / 3600,
        task_runs=math.ceil(sources / inputs.sources_per_task_run),
        task_runs_unbatched=sources,
        cpu_workers_balanced=math.ceil(max(balanced_cores, 0.0) / cluster.cores_per_cpu_worker)
        if math.isfinite(balanced_cores) else 0,
        gpu_workers_balanced=_gpu_workers_balanced(curate.cores_per_gpu_balanced, cluster),
    )


# ------------------------------------------------------------------------------------- assumptions (marked)

# The datasets (docs/recipe.md §1): LVD 577M clips, 212 years of video -> a mean of 11.6 s per clip; LVD-F 152M
# clips; LVD-10M (9.8M clips) -> LVD-10M-F 2.3M clips; clips average about 300 frames, i.e. ~25.9 fps at 11.6 s.
LVD_MEAN_CLIP_S = 212 * 365.25 * 86400 / 577e6
LVD_FPS = 300 / LVD_MEAN_CLIP_S
DATASETS = (
    Dataset("LVD -> LVD-F", 577e6, 152e6, LVD_MEAN_CLIP_S, LVD_FPS),
    Dataset("LVD-10M -> LVD-10M-F", 9.8e6, 2.3e6, LVD_MEAN_CLIP_S, LVD_FPS),
)
# NVIDIA datasheets, dense bf16 tensor-core peak (without sparsity).
GPU_PEAKS = {"A100": 312e12, "H100-SXM": 989e12}
# Share of that peak each scorer reaches at the pools' batch sizes: our assumption, not measured.
UTILISATION = {"clip": 0.40, "caption": 0.15, "video_caption": 0.30, "llm_summary": 0.05, "raft": 0.25}
UTILISATION_WHY = {
    "clip": "ViT forward, 48 frames per batch: large GEMMs",
    "caption": "beam search (3 beams, 30 tokens): many small decoder steps",
    "video_caption": "GIT: a ViT-L/14 over 6 frames dominates",
    "llm_summary": "token-by-token decoding of a 1.5B LM is memory-bound",
    "raft": "correlation lookups and a GRU per iteration: gathers, small convs",
}
# Assumptions for the captioners that have no architecture to count here (real configs need the hub):
GIT_FRAMES = 6  # scorers.video_caption.num_frames; GIT-large's image encoder is a CLIP ViT-L/14 (224 px)
LLM_PARAMS = 1.54e9  # Qwen2.5-1.5B-Instruct, the example in docs/curation.md
LLM_TOKENS = 110 + 60  # prompt with both captions + at most scorers.llm_summary.max_new_tokens
DEFAULT_RESOLUTION = (1280, 720)  # LVD's resolution is not published: assumed 720p sources
DEFAULT_VIDEO_MBIT_S = 2.0  # assumed bitrate of 720p H.264 web video; clip files are stream copies
SAMPLE_OVERHEAD_BYTES = 4096  # three tar headers with padding + the JSON row + the caption


def build_inputs(measured: Mapping, dataset: Dataset, cluster: ClusterShape, args: argparse.Namespace) -> CostInputs:
    """Model inputs from the measurements (per-frame CPU costs scaled to the assumed resolution)."""
    scale = (args.width * args.height) / measured["pixels_per_frame"]
    cpu = [CpuCost(name, core_s * (scale if name in measured["pixel_scaled"] else 1.0), "frame")
           for name, core_s in measured["cpu_core_s_per_frame"].items()]
    cpu += [CpuCost(name, core_s, "clip") for name, core_s in measured["cpu_core_s_per_clip"].items()]
    raft_scale = (args.width * args.height) / measured["raft_clip_pixels"]
    cpu.append(CpuCost("raft frames (decode clip file)", measured["raft_core_s_per_clip_frame"] * raft_scale,
                       "kept_frame"))
    flops = measured["flops_per_clip"]
    per_frame_vit = flops["clip"] / 3  # CLIP scores 3 frames per clip
    raft_pairs = measured["raft_pairs_per_mean_clip"]
    gpu = [
        GpuCost("clip", flops["clip"], UTILISATION["clip"], "clip"),
        GpuCost("caption", flops["caption"], UTILISATION["caption"], "clip"),
        GpuCost("video_caption", GIT_FRAMES * per_frame_vit, UTILISATION["video_caption"], "clip",
                "6 x counted ViT-L/14 frame FLOPs (decoder ignored); utilisation assumed"),
        GpuCost("llm_summary", 2 * LLM_PARAMS * LLM_TOKENS, UTILISATION["llm_summary"], "clip",
                "2 x 1.54B params x 170 tokens; utilisation assumed"),
        GpuCost("raft", flops["raft_per_pair"] * raft_pairs, UTILISATION["raft"], "kept_clip",
                f"counted FLOPs per pair x {raft_pairs} pairs; utilisation assumed"),
    ]
    return CostInputs(
        dataset=dataset, cpu=tuple(cpu), gpu=tuple(gpu), cluster=cluster,
        video_bytes_per_s=args.video_mbit_s * 1e6 / 8, sample_overhead_bytes=SAMPLE_OVERHEAD_BYTES,
        clips_per_source=args.clips_per_source, sources_per_task_run=args.sources_per_task_run,
    )


# --------------------------------------------------------------------------------------------- measurement


def _cpu_time() -> float:
    import time

    return time.process_time()


def _best(repeats: int, function, *args) -> tuple[float, object]:
    """Least CPU time (core-seconds of this process, all threads) over `repeats` calls, and a result."""
    best, result = math.inf, None
    for _ in range(repeats):
        started = _cpu_time()
        result = function(*args)
        best = min(best, _cpu_time() - started)
    return best, result


def _flops_and_cpu_s(function) -> tuple[float, float]:
    """(FLOPs, CPU seconds) of one scorer call; the call is made twice, timed without counting.

    Counting uses torch's per-operator FLOP formulas (torch.utils.flop_counter) in a bare dispatch mode:
    FlopCounterMode's module tracker breaks under inference_mode (the scorers would return error rows), and
    nn.MultiheadAttention's fused CPU fast path is switched off while counting, since no formula sees inside
    it (a third of a ViT's FLOPs). A call whose rows carry an error is refused, never counted.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class CountFlops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            formula = flop_registry.get(func._overloadpacket)
            if formula is None:  # e.g. aten.linear under inference_mode: count what it decomposes into
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
            return out

    def checked():
        rows = function()
        errors = [row["error"] for row in rows if row.get("error")]
        if errors:
            raise RuntimeError(f"scorer call failed: {errors[0]}")

    counter = CountFlops()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            checked()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    started = _cpu_time()
    checked()
    return float(counter.flops), _cpu_time() - started


def _random_open_clip(name: str, folder: Path) -> str:
    """A random-init open_clip model of architecture `name`, saved in local-dir format (no hub access)."""
    import open_clip
    import torch

    from common.openclip import save_local_dir

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    save_local_dir(model, open_clip.get_model_config(name), folder / name)
    return f"local-dir:{folder / name}"


def measure(repeats: int, clip_model: str, coca_model: str, threads: int = 1, log=print) -> dict:
    """Per-frame and per-clip costs of the real curation code on the bundled sample footage (this machine),
    decoding and re-encoding on `threads` threads per source (decode.threads; 1 is what a curation task given
    1 CPU by Ray uses)."""
    import tempfile

    import av
    import torch

    from common.cache import benchmark_cache
    from curation.chain import chain_steps
    from curation.config import CurationConfig
    from curation.sample_data import GROUND_TRUTH, VIDEO_DIR, build_sample_data

    torch.set_num_threads(1)
    root = benchmark_cache() / "sample"
    build_sample_data(root)
    truth = json.loads((root / GROUND_TRUTH).read_text())
    files = [root / VIDEO_DIR / name for name, entry in sorted(truth.items()) if not entry["error"]]
    config = CurationConfig.from_overrides({"decode": {"threads": threads}})
    steps = {
        "decode": frozenset(),
        "analysis": frozenset({"analysis"}),
        "cuts": frozenset({"analysis", "cuts"}),
        "motion": frozenset({"analysis", "cuts", "motion"}),
    }
    totals = dict.fromkeys([*steps, "analyse", "process_source"], 0.0)
    decode_per_file: dict[str, dict] = {}
    frames = pixels = clips = copied = 0
    results = []
    with tempfile.TemporaryDirectory(prefix="lvd-cost-") as scratch:
        for path in files:
            with av.open(str(path)) as container:
                context = container.streams.video[0].codec_context
                size = context.width * context.height
            for name, chosen in steps.items():
                seconds, count = _best(repeats, chain_steps, path, config, chosen)
                totals[name] += seconds
                if name == "decode":
                    decode_per_file[path.name] = {"frames": count, "pixels": size, "decode_s": seconds}
            frames += count
            pixels += count * size
            totals["analyse"] += _best(repeats, _analyse_only, path, config, Path(scratch) / "analyse")[0]
            seconds, result = _best_source(repeats, path, Path(scratch), config)
            totals["process_source"] += seconds
            clips += len(result.clip_rows)
            copied += sum(row["clip_method"] != "reencode" for row in result.clip_rows)
            results.append(result)
        per_frame = {
            "decode": totals["decode"] / frames,
            "analysis copy": max(totals["analysis"] - totals["decode"], 0.0) / frames,
            "cut cascade": max(totals["cuts"] - totals["analysis"], 0.0) / frames,
            "motion (Farneback)": max(totals["motion"] - totals["cuts"], 0.0) / frames,
            "scorer frame spool": max(totals["analyse"] - totals["motion"], 0.0) / frames,
            "clip writing": max(totals["process_source"] - totals["analyse"], 0.0) / frames,
        }
        log(f"sample footage: {len(files)} videos, {frames} frames, {clips} clips ({copied} stream-copied), "
            f"mean {pixels / frames:,.0f} px per frame; best of {repeats}")
        scored = [clip for result in results for clip in result.clip_frames][:8]
        clip_files = [row for result in results for row in result.clip_rows]
        measured = {
            "machine": f"{_cpu_model()}, {_cores()} cores (shared; CPU seconds of this process)",
            "videos": len(files), "frames": frames, "clips": clips, "copied_clips": copied,
            "pixels_per_frame": pixels / frames,
            "pixel_scaled": ["decode", "analysis copy", "scorer frame spool", "clip writing"],
            "cpu_core_s_per_frame": per_frame,
            "decode_per_file": decode_per_file,
            "settings": {"decode.analysis_width": config.decode.analysis_width,
                         "decode.threads": config.decode.threads,
                         "clips.reencode_preset": config.clips.reencode_preset,
                         "clips.reencode_crf": config.clips.reencode_crf},
        }
        measured["clip_writing_reencode_heavy"] = _reencode_heavy_clip_writing(Path(scratch), config, log)
        measured["clip_methods"] = {
            "sample footage": _clip_method_costs(files, Path(scratch) / "methods", config, log),
            "short shots": _clip_method_costs(_short_clip_files(12), Path(scratch) / "methods-short", config, log),
        }
        measured.update(_measure_scorers(scored, clip_files, clip_model, coca_model, Path(scratch), log))
    return measured


def _analyse_only(path: Path, config, work_dir: Path) -> None:
    """The decode pass of process_source without its live re-encoder: chain + scorer-frame spool."""
    from curation.chain import decode_and_analyse

    decode_and_analyse(path, config, work_dir, live_clips=False).spool.close()


def _best_source(repeats: int, path: Path, scratch: Path, config):
    """(least CPU seconds, result) of process_source (decode pass with live re-encoding + clip files)."""
    from curation.chain import process_source

    best = (math.inf, None)
    for attempt in range(repeats):
        started = _cpu_time()
        result = process_source(path, path.name, scratch / f"{path.stem}-{attempt}", config)
        best = min(best, (_cpu_time() - started, result), key=lambda pair: pair[0])
    if best[1].source_row["status"] != "ok":
        raise RuntimeError(f"{path.name}: {best[1].source_row['error']}")
    return best


def _short_clip_files(count: int) -> list[Path]:
    """The first `count` files of benchmarks/curation.py's short-clip set (upload-like GOPs, 1-4 s shots)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_curation", Path(__file__).with_name("curation.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files, _ = bench.build_short_clip_set(bench.CACHE / "short_clips")
    return files[:count]


def _clip_method_costs(files: list[Path], scratch: Path, config, log) -> dict:
    """Both clip methods on the same files: clip-writing CPU per source frame (process_source minus the decode
    pass without clip writing), clip bytes per byte of the shots at the source's bitrate, the roll (frames
    decoded but not shown), and the CPU to decode every clip file once per shown frame (a training read)."""
    import av

    from curation.chain import process_source

    analyse = sum(_best(1, _analyse_only, path, config, scratch / "analyse")[0] for path in files)
    frames = sum(_count_frames(path) for path in files)
    out = {}
    for method in ("exact-copy", "reencode"):
        method_config = replace(config, clips=replace(config.clips, method=method))
        seconds = clip_bytes = shot_bytes = shown = rolled = 0.0
        rows = []
        for path in files:
            started = _cpu_time()
            result = process_source(path, path.name, scratch / method / path.stem, method_config)
            seconds += _cpu_time() - started
            source_frames = result.source_row["num_frames"] or 1
            for row in result.clip_rows:
                length = row["end_frame"] - row["start_frame"]
                clip_bytes += Path(row["clip_path"]).stat().st_size
                shot_bytes += path.stat().st_size * length / source_frames
                shown += length
                rolled += (row.get("pre_roll_frames") or 0) + (row.get("post_roll_frames") or 0)
                rows.append(row)
        started = _cpu_time()
        for row in rows:
            with av.open(row["clip_path"]) as container:
                for _ in container.decode(video=0):
                    pass
        read = _cpu_time() - started
        out[method] = {"clip_write_core_s_per_frame": max(seconds - analyse, 0.0) / frames,
                       "clip_bytes_factor": clip_bytes / shot_bytes, "roll_frames_per_shown_frame": rolled / shown,
                       "read_core_s_per_frame": read / shown, "clips": len(rows),
                       "reencoded_clips": sum(row["clip_method"] == "reencode" for row in rows)}
        log(f"{method} on {len(files)} files: clip writing {out[method]['clip_write_core_s_per_frame'] * 1e3:.3f} CPU "
            f"ms per source frame, clip bytes x{out[method]['clip_bytes_factor']:.2f} of the shot at the source "
            f"bitrate, roll {rolled / shown:.1%} of shown frames, read {read / shown * 1e3:.2f} CPU ms per frame")
    return out


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.demux(video=0) if _.size)


def _reencode_heavy_clip_writing(scratch: Path, config, log, count: int = 12) -> dict:
    """Clip writing on upload-like files whose keyframes rarely fall on cuts (benchmarks/curation.py's short-clip
    set) with clips.method `keyframe`, where most clips must then be re-encoded (exact copies re-encode none:
    `_clip_method_costs` measures both methods)."""
    config = replace(config, clips=replace(config.clips, method="keyframe"))
    frames = clips = reencoded = 0
    pixels = clip_write = 0.0
    for path in _short_clip_files(count):
        seconds, result = _best_source(1, path, scratch / "short", config)
        clip_write += max(seconds - _best(1, _analyse_only, path, config, scratch / "short-analyse")[0], 0.0)
        row = result.source_row
        frames += row["num_frames"]
        pixels += row["num_frames"] * row["width"] * row["height"]
        clips += len(result.clip_rows)
        reencoded += sum(r["clip_method"] == "reencode" for r in result.clip_rows)
    log(f"re-encode-heavy set: {count} files, {frames} frames, {reencoded} of {clips} clips re-encoded, clip writing "
        f"{clip_write / frames * 1e3:.2f} CPU ms per frame")
    return {"core_s_per_frame": clip_write / frames, "pixels_per_frame": pixels / frames, "clips": clips,
            "reencoded": reencoded, "files": count}


def _measure_scorers(clips: list, clip_rows: list[dict], clip_model: str, coca_model: str, scratch: Path,
                     log) -> dict:
    import torch

    from curation.scorers.captions import CocaCaptioner
    from curation.scorers.clip_scores import ClipScorer
    from curation.scorers.config import CaptionConfig, ClipScoreConfig, RaftConfig, TextAreaConfig
    from curation.scorers.raft_motion import RaftMotionScorer, build_raft, pair_schedule, sample_raft_frames
    from curation.scorers.text_area import TextAreaScorer

    for clip in clips:
        clip.caption = "a cyclist rides through a city street"
    out: dict = {"cpu_core_s_per_clip": {}, "flops_per_clip": {}, "scorer_cpu_s_per_clip": {}}
    text = TextAreaScorer(TextAreaConfig(backend="ppocr"), "cpu", 1)
    text.score(clips[:1])  # warm-up
    seconds, _ = _best(1, text.score, clips)
    out["cpu_core_s_per_clip"]["text area (PP-OCR, CPU)"] = seconds / len(clips)
    log(f"text area (PP-OCR, real weights): {seconds / len(clips):.3f} CPU s per clip")

    batch = clips[:2]
    model = _random_open_clip(clip_model, scratch)
    scorer = ClipScorer(ClipScoreConfig(model_name=model), "cpu", 1)
    flops, seconds = _flops_and_cpu_s(lambda: scorer.score(batch))
    out["flops_per_clip"]["clip"], out["scorer_cpu_s_per_clip"]["clip"] = flops / len(batch), seconds / len(batch)
    log(f"CLIP {clip_model} (random weights): {flops / len(batch) / 1e9:.1f} GFLOP, {seconds / len(batch):.2f} "
        "CPU s per clip")

    model = _random_open_clip(coca_model, scratch)
    captioner = CocaCaptioner(CaptionConfig(model_name=model), "cpu", 1)
    flops, seconds = _flops_and_cpu_s(lambda: captioner.score(batch[:1]))
    out["flops_per_clip"]["caption"], out["scorer_cpu_s_per_clip"]["caption"] = flops, seconds
    log(f"CoCa {coca_model} (random weights, beam 3, 30 tokens): {flops / 1e9:.1f} GFLOP, {seconds:.2f} "
        "CPU s per clip")

    torch.manual_seed(0)
    weights = scratch / "raft_large.pth"
    torch.save(build_raft("raft_large").state_dict(), weights)
    raft_config = RaftConfig(weights=str(weights), max_pairs=1)
    raft = RaftMotionScorer(raft_config, "cpu", 1)
    row = max(clip_rows, key=lambda r: (r["width"] * r["height"], r["end_frame"] - r["start_frame"]))
    length = row["end_frame"] - row["start_frame"]
    sample_cpu, pair = _best(1, sample_raft_frames, row["clip_path"], row["clip_id"], row["fps"], length, raft_config)
    flops, seconds = _flops_and_cpu_s(lambda: raft.score([pair]))
    mean_frames = round(LVD_MEAN_CLIP_S * LVD_FPS)
    out["flops_per_clip"]["raft_per_pair"] = flops
    out["scorer_cpu_s_per_clip"]["raft (one pair)"] = seconds
    out["raft_pairs_per_mean_clip"] = len(pair_schedule(mean_frames, LVD_FPS, RaftConfig().sample_fps,
                                                        RaftConfig().max_pairs))
    # the hq pass decodes the clip file up to its last pair: per frame of the clip, scaled like decode
    out["raft_core_s_per_clip_frame"] = sample_cpu / length
    out["raft_clip_pixels"] = row["width"] * row["height"]
    log(f"RAFT large (random weights) at 800x450: {flops / 1e9:.1f} GFLOP, {seconds:.2f} CPU s per pair; "
        f"{out['raft_pairs_per_mean_clip']} pairs per mean clip; clip-file sampling "
        f"{sample_cpu / length * 1e3:.2f} CPU ms per frame ({row['width']}x{row['height']})")
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cores() -> int:
    import os

    return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------- report


def _fmt(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:,.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:,.1f}k"
    if value >= 1e3:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def _bytes(value: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value / 1e6:,.1f} MB"


def report_table(estimates: list[CostEstimate], inputs: list[CostInputs]) -> str:
    """A markdown table, one column per dataset."""
    names = [e.dataset for e in estimates]
    rows: list[tuple[str, list[str]]] = [
        ("clips in -> kept", [f"{_fmt(i.dataset.clips)} -> {_fmt(i.dataset.kept_clips)}" for i in inputs]),
        ("video hours / frames", [f"{_fmt(e.video_hours)} h / {e.frames / 1e9:,.1f}G" for e in estimates]),
    ]
    for name in estimates[0].cpu_core_hours:
        rows.append((f"CPU core-h: {name}", [_fmt(e.cpu_core_hours[name]) for e in estimates]))
    rows.append(("**CPU core-hours, total**", [f"**{_fmt(e.total_cpu_core_hours)}**" for e in estimates]))
    for name in estimates[0].gpu_hours:
        rows.append((f"GPU-h: {name}", [_fmt(e.gpu_hours[name]) for e in estimates]))
    rows.append((f"**{inputs[0].cluster.gpu_name} GPU-hours, total**",
                 [f"**{_fmt(e.total_gpu_hours)}**" for e in estimates]))
    rows += [
        ("raw input (at the assumed bitrate)", [_bytes(e.input_bytes) for e in estimates]),
        ("**shard storage (kept clips)**", [f"**{_bytes(e.shard_bytes)}**" for e in estimates]),
        (f"sources (clips per source: {inputs[0].clips_per_source:g})", [_fmt(e.sources) for e in estimates]),
        ("Prefect task runs, one per source", [_fmt(e.task_runs_unbatched) for e in estimates]),
        (f"**Prefect task runs, {inputs[0].sources_per_task_run} sources each**",
         [f"**{_fmt(e.task_runs)}**" for e in estimates]),
    ]
    for phase in (PHASE_CURATE, PHASE_HQ):
        rows.append((f"wall h, {phase} phase: cpu-decode / gpu",
                     [f"{_fmt(e.phases[phase].cpu_wall_hours)} / {_fmt(e.phases[phase].gpu_wall_hours)} "
                      f"({e.phases[phase].bottleneck} bound)" for e in estimates]))
    rows.append(("**wall time**", [f"**{_fmt(e.wall_hours)} h = {e.wall_hours / 24:,.1f} days**" for e in estimates]))
    rows.append(("bottleneck", [e.bottleneck for e in estimates]))
    rows.append(("CPU cores per GPU to balance (curate)",
                 [f"{e.phases[PHASE_CURATE].cores_per_gpu_balanced:,.0f}" for e in estimates]))
    rows.append((f"cpu-decode replicas to keep {inputs[0].cluster.gpus} GPUs busy (curate)",
                 [f"{e.cpu_workers_balanced:,}" for e in estimates]))
    rows.append((f"gpu replicas that {inputs[0].cluster.cpu_workers} cpu-decode replicas keep busy (curate)",
                 [f"{e.gpu_workers_balanced:,}" for e in estimates]))
    lines = [f"| | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | {' | '.join(values)} |" for label, values in rows]
    return "\n".join(lines)


def method_estimates(measured: Mapping, base: CostInputs, pixels: int) -> dict[tuple[str, str], CostEstimate]:
    """The estimate once per (footage set, clip method) measured: clip writing, clip bytes and the training-time
    decode of that method in place of the base's (CPU scaled by pixels, as the base's are)."""
    scale = pixels / measured["pixels_per_frame"]
    out = {}
    for set_name, methods in measured.get("clip_methods", {}).items():
        for method, costs in methods.items():
            cpu = tuple(replace(item, core_s=costs["clip_write_core_s_per_frame"] * scale,
                                source=f"measured, {set_name}, {method}")
                        if item.name == "clip writing" else item for item in base.cpu)
            out[(set_name, method)] = estimate(replace(base, cpu=cpu, clip_bytes_factor=costs["clip_bytes_factor"],
                                                       read_core_s_per_frame=costs["read_core_s_per_frame"] * scale))
    return out


def method_table(estimates: Mapping[tuple[str, str], CostEstimate]) -> str:
    lines = ["| footage / method | clip writing CPU core-h | CPU core-h, total | shard storage | "
             "training decode, core-h per epoch |", "|---|---|---|---|---|"]
    for (set_name, method), item in estimates.items():
        lines.append(f"| {set_name} / {method} | {_fmt(item.cpu_core_hours['clip writing'])} | "
                     f"{_fmt(item.total_cpu_core_hours)} | {_bytes(item.shard_bytes)} | "
                     f"{_fmt(item.read_core_hours_per_epoch)} |")
    return "\n".join(lines)


def assumptions_table(measured: Mapping, inputs: CostInputs) -> str:
    cluster = inputs.cluster
    lines = ["| input | value | source |", "|---|---|---|"]
    for item in inputs.cpu:
        unit = {"frame": "source frame", "clip": "clip", "kept_frame": "frame of a kept clip"}[item.per]
        lines.append(f"| {item.name} | {item.core_s * 1e3:.3f} CPU ms per {unit} | measured here |")
    for item in inputs.gpu:
        unit = "kept clip" if item.per == "kept_clip" else "clip"
        seconds = item.flops / (cluster.gpu_peak_flops * item.utilisation)
        lines.append(f"| {item.name} on GPU | {item.flops / 1e9:,.0f} GFLOP per {unit} at {item.utilisation:.0%} "
                     f"of peak = {seconds * 1e3:.2f} ms | {item.source} ({UTILISATION_WHY[item.name]}) |")
    lines.append(f"| GPU peak | {cluster.gpu_name}: {cluster.gpu_peak_flops / 1e12:.0f} TFLOP/s bf16 dense | "
                 "NVIDIA datasheet |")
    lines.append(f"| cluster | {cluster.cpu_workers} cpu-decode x {cluster.cores_per_cpu_worker} cores, "
                 f"{cluster.gpu_workers} gpu x {cluster.gpus_per_gpu_worker} {cluster.gpu_name} "
                 f"(+ {cluster.spare_cores_per_gpu_worker} spare cores each for CPU work) = {cluster.cores:,} cores, "
                 f"{cluster.gpus} GPUs | the maxReplicas of infra/ray/kuberay-raycluster.yaml's groups; spare cores "
                 "assumed (half a gpu pod's 96) |")
    lines.append(f"| video bitrate | {inputs.video_bytes_per_s * 8 / 1e6:.1f} Mbit/s | assumption (720p H.264 web "
                 "video; clip files are stream copies) |")
    lines.append(f"| clips per source / sources per task run | {inputs.clips_per_source:g} / "
                 f"{inputs.sources_per_task_run} | parameters |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", help="JSON of an earlier run: skip measuring, re-estimate from its inputs")
    parser.add_argument("--json", default="out/cost_model.json", help="where to write measurements + estimates")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for the CPU chain measurements")
    parser.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture counted for CLIP")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="decode.threads while measuring (1: a curation task given 1 CPU by Ray)")
    parser.add_argument("--coca-model", default="coca_ViT-L-14", help="open_clip CoCa architecture counted")
    parser.add_argument("--width", type=int, default=DEFAULT_RESOLUTION[0], help="assumed source width")
    parser.add_argument("--height", type=int, default=DEFAULT_RESOLUTION[1], help="assumed source height")
    parser.add_argument("--video-mbit-s", type=float, default=DEFAULT_VIDEO_MBIT_S)
    parser.add_argument("--clips-per-source", type=float, default=1.0,
                        help="clips a source video yields (1: every LVD clip is its own source, the most task runs)")
    parser.add_argument("--sources-per-task-run", type=int, default=1000)
    parser.add_argument("--cpu-workers", type=int, default=64, help="cpu-decode replicas")
    parser.add_argument("--cores-per-cpu-worker", type=int, default=32)
    parser.add_argument("--gpu-workers", type=int, default=32, help="gpu replicas")
    parser.add_argument("--gpus-per-gpu-worker", type=int, default=8)
    parser.add_argument("--spare-cores-per-gpu-worker", type=int, default=48,
                        help="CPUs of a gpu pod (96 in the KubeRay config) left to decode tasks, the rest to actors")
    parser.add_argument("--gpu", choices=sorted(GPU_PEAKS), default="A100")
    args = parser.parse_args()
    if args.repeats < 1 or args.sources_per_task_run < 1 or args.clips_per_source <= 0 or args.decode_threads < 1:
        parser.error("--repeats, --sources-per-task-run and --decode-threads must be >= 1, --clips-per-source > 0")

    if args.measured:
        measured = json.loads(Path(args.measured).read_text())["measured"]
    else:
        if not __package__:  # run as a script: benchmarks/ must not shadow the `curation` package
            here = Path(__file__).resolve().parent
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
            sys.path.insert(0, str(here.parent))
        measured = measure(args.repeats, args.clip_model, args.coca_model, args.decode_threads)
    cluster = ClusterShape(args.cpu_workers, args.cores_per_cpu_worker, args.gpu_workers, args.gpus_per_gpu_worker,
                           args.gpu, GPU_PEAKS[args.gpu], args.spare_cores_per_gpu_worker)
    inputs = [build_inputs(measured, dataset, cluster, args) for dataset in DATASETS]
    estimates = [estimate(item) for item in inputs]
    print(f"\nInputs ({measured['machine']}; sources assumed {args.width}x{args.height}, CPU costs of decode, "
          f"analysis copy, spool and clip writing scaled by pixels from the footage's "
          f"{measured['pixels_per_frame']:,.0f} px):\n")
    if measured.get("settings"):
        print("Curation settings measured: " + ", ".join(f"{k}={v}" for k, v in measured["settings"].items()) + "\n")
    print(assumptions_table(measured, inputs[0]))
    print("\nEstimate:\n")
    print(report_table(estimates, inputs))
    lvd = estimates[0]
    curate, hq = lvd.phases[PHASE_CURATE], lvd.phases[PHASE_HQ]
    print(f"\nBottleneck ({lvd.dataset}): {lvd.bottleneck}. The curate phase's CPU work needs "
          f"{curate.cores_per_gpu_balanced:,.0f} cores per GPU to keep pace with its GPU work: keeping all "
          f"{cluster.gpus} GPUs busy takes {lvd.cpu_workers_balanced:,} cpu-decode replicas of "
          f"{cluster.cores_per_cpu_worker} cores; the {cluster.cpu_workers} cpu-decode replicas keep "
          f"{lvd.gpu_workers_balanced:,} gpu replicas busy. The hq (RAFT) phase needs "
          f"{hq.cores_per_gpu_balanced:,.1f} cores per GPU ({hq.bottleneck} bound on this shape).")
    direct = [(name, entry) for name, entry in measured.get("decode_per_file", {}).items()
              if entry["pixels"] == args.width * args.height]
    for name, entry in direct:
        scaled = next(item.core_s for item in inputs[0].cpu if item.name == "decode")
        print(f"Check of the pixel scaling: decode measured directly on {name} ({args.width}x{args.height}): "
              f"{entry['decode_s'] / entry['frames'] * 1e3:.2f} CPU ms per frame; scaled figure used: "
              f"{scaled * 1e3:.2f}.")
    cpu_times = measured.get("scorer_cpu_s_per_clip", {})
    if cpu_times:
        print("Scorers on this CPU (1 thread, for comparison): " + ", ".join(
            f"{name} {seconds:.2f} s per clip" if "pair" not in name else f"{name} {seconds:.2f} s"
            for name, seconds in cpu_times.items()))
    heavy = measured.get("clip_writing_reencode_heavy")
    sensitivity = None
    if heavy:
        core_s = heavy["core_s_per_frame"] * args.width * args.height / heavy["pixels_per_frame"]
        cpu = tuple(replace(item, core_s=core_s, source="measured, re-encode-heavy set")
                    if item.name == "clip writing" else item for item in inputs[0].cpu)
        sensitivity = estimate(replace(inputs[0], cpu=cpu))
        print(f"Sensitivity: with clip writing as on upload-like files cut with clips.method keyframe, where "
              f"{heavy['reencoded']} of {heavy['clips']} clips must be re-encoded ({core_s * 1e3:.2f} instead of "
              f"{estimates[0].cpu_core_hours['clip writing'] * 3600 / estimates[0].frames * 1e3:.2f} CPU ms per frame "
              f"at {args.width}x{args.height}), {DATASETS[0].name} needs {_fmt(sensitivity.total_cpu_core_hours)} "
              f"CPU core-hours and {sensitivity.wall_hours / 24:,.1f} days on this shape ({sensitivity.bottleneck} "
              f"bound; {sensitivity.cpu_workers_balanced:,} cpu-decode replicas to balance).")
    by_method = method_estimates(measured, inputs[0], args.width * args.height)
    if by_method:
        print(f"\nClip methods ({DATASETS[0].name}; clip writing, clip bytes and training-time decode measured on each "
              "set with each method):\n")
        print(method_table(by_method))
        for set_name in {key[0] for key in by_method}:
            copy, encode = by_method[(set_name, "exact-copy")], by_method[(set_name, "reencode")]
            saved = encode.total_cpu_core_hours - copy.total_cpu_core_hours
            extra = copy.read_core_hours_per_epoch - encode.read_core_hours_per_epoch
            epochs = f"{saved / extra:,.1f} epochs" if extra > 0 else "never"
            storage = copy.shard_bytes - encode.shard_bytes
            print(f"- {set_name}: exact copies save {_fmt(saved)} CPU core-hours of curation and cost "
                  f"{_fmt(extra)} more core-hours of decoding per training epoch over the kept clips (break-even "
                  f"after {epochs}); their shards take {_bytes(abs(storage))} {'more' if storage > 0 else 'less'}.")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "measured": measured,
        "arguments": vars(args),
        "inputs": [asdict(item) for item in inputs],
        "estimates": [asdict(item) for item in estimates],
        "sensitivity_reencode_heavy": asdict(sensitivity) if sensitivity else None,
        "clip_methods": {f"{set_name} / {method}": asdict(item) for (set_name, method), item in by_method.items()},
    }, indent=1, default=str))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
