"""Scale-out on a real Ray cluster: curation throughput on 1 node vs 2 nodes, training samples/s with 1 vs 2
DDP workers, side by side in one run.

Both clusters are `infra.local.local_ray_cluster`s on this machine (`ray start --head` + `ray start --address`,
127.0.0.1, `--cpus-per-node` CPUs each, default 1), each node pinned to cores of its own (`pin_cores`) when the
machine has enough, so "2 nodes" means two Ray nodes of one core each, as two 1-core machines would be: without
pinning, the 1-node run borrows the idle core through its decoder and x264 threads and the ratio understates
what a second machine adds. The ratio says how well the work spreads over nodes; the driver (this process) is
not pinned and mostly waits.

  curation  the per-source unit of `curate-lvd` (`curation.dataset.curate_source`: decode, cut cascade, clips,
            motion, commit), one Ray task per source with 1 CPU, as the flow fans it out (without Prefect's
            bookkeeping), over `--copies` copies of the ok sample clips; wall time from the first submit to
            the last result. Target: 2 nodes >= 1.8x 1 node.
  training  `train-stage` stage II, tiny preset, global batch 2, on the 2-node cluster: 1 worker (2 samples a
            step) vs 2 DDP workers (gloo, one per node, 1 sample each); samples/s over the steps after the
            first `--warmup-steps`.

Usage: python benchmarks/scale_out.py [--copies 25] [--train-steps 12] [--cpus-per-node 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: the repository root, not benchmarks/, on the path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cache import benchmark_cache  # noqa: E402
from curation.config import CurationConfig  # noqa: E402
from curation.dataset import curate_source, discover_sources, finalize, prepare_output  # noqa: E402
from curation.sample_data import VIDEO_DIR, build_sample_data  # noqa: E402
from infra.local import local_ray_cluster, ray_init_kwargs  # noqa: E402

CACHE = benchmark_cache()
# The sample clips that curate to clips (the bad inputs finish in milliseconds and would only add overhead).
OK_SOURCES = ("bikes.mp4", "bigbuckbunny.mp4", "cuts_hard.mp4", "dissolves.mp4", "fade_black.mp4", "flashes.mp4",
              "static_shot.mp4", "text_big.mp4", "text_small.mp4", "odd_161x97.mp4")
CONFIG = {"scorers": {"text": {"enabled": False}}}  # the learned scorers run on their own actor pools


def build_workload(root: Path, copies: int) -> Path:
    """`copies` copies of each ok sample clip under distinct names (each is its own source)."""
    sample = CACHE / "sample"
    build_sample_data(sample)
    folder = root / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for name in OK_SOURCES:
            target = folder / f"{Path(name).stem}-{copy}.mp4"
            if not target.exists():
                shutil.copy(sample / VIDEO_DIR / name, target)
    return folder


def curate_on(address: str, raw: Path, out: Path) -> dict[str, float]:
    """Curate every source of `raw` into `out` as Ray tasks of 1 CPU on the cluster at `address`."""
    import ray

    config = CurationConfig.from_overrides(CONFIG)
    layout = prepare_output(out, config)
    sources = list(discover_sources(raw, config.video_extensions))
    ray.init(**ray_init_kwargs(address))
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(curate_source)
        # one small source per node first, concurrently (1 CPU each: one lands on each node), so that every
        # node's worker has imported the chain before the clock starts
        smallest = min(sources, key=lambda source: (raw / source).stat().st_size)
        nodes = len([node for node in ray.nodes() if node["Alive"]])
        ray.get([task.remote(str(raw), smallest, str(out.parent / f"{out.name}-warmup{i}"), config)
                 for i in range(nodes)])
        start = time.perf_counter()
        rows = ray.get([task.remote(str(raw), source, str(out), config) for source in sources])
        wall = time.perf_counter() - start
        nodes_used = len({row["node_id"] for row in rows})
    finally:
        ray.shutdown()
    finalize(layout, config)
    frames = sum(row["num_frames"] or 0 for row in rows)
    return {"sources": len(rows), "frames": frames, "wall_s": wall, "sources_per_s": len(rows) / wall,
            "frames_per_s": frames / wall, "nodes_used": nodes_used}


def train_on(address: str, data: Path, out: Path, workers: int, steps: int, warmup_steps: int) -> dict[str, float]:
    """Stage II tiny on the cluster with `workers` DDP workers; samples/s after the warm-up steps."""
    from training.loop import run_stage
    from training.request import StageRunRequest

    result = run_stage(StageRunRequest.build(stage=2, data=str(data), output_root=str(out), init="tiny",
                                             max_steps=steps, micro_batch_size=1, num_workers=workers,
                                             checkpoint_every=steps, ray_address=address))
    import ray

    ray.shutdown()
    rows = [json.loads(line) for line in (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [row["samples_per_s"] for row in rows if row["step"] > warmup_steps]
    return {"workers": workers, "steps": steps, "samples_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=25,
                        help="copies of each ok sample clip (10 sources per copy; 25: over a minute on 1 node)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lvd-scale-out-"))
    raw = build_workload(work, args.copies)
    pin = len(os.sched_getaffinity(0)) >= 2 * args.cpus_per_node
    if not pin:
        print("fewer cores than 2 nodes need: the nodes are not pinned and share the cores", flush=True)
    load_before = os.getloadavg()

    curation = {}
    for nodes in (1, 2):
        out = work / f"curate-{nodes}"
        shutil.rmtree(out, ignore_errors=True)
        with local_ray_cluster(nodes=nodes, cpus_per_node=args.cpus_per_node, pin_cores=pin) as cluster:
            curation[nodes] = curate_on(cluster.address, raw, out)
        print(f"curation on {nodes} node(s): {curation[nodes]}", flush=True)

    training = {}
    with local_ray_cluster(nodes=2, cpus_per_node=args.cpus_per_node, pin_cores=pin) as cluster:
        for workers in (1, 2):
            out = work / f"train-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            training[workers] = train_on(cluster.address, work / "curate-2", out, workers, args.train_steps,
                                         args.warmup_steps)
            print(f"training with {workers} worker(s): {training[workers]}", flush=True)
    load_after = os.getloadavg()

    print()
    print(f"{'measure':<44}{'1':>12}{'2':>12}{'ratio':>9}")
    one, two = curation[1], curation[2]
    print(f"{'curation: sources/s (1 vs 2 nodes)':<44}{one['sources_per_s']:>12.3f}{two['sources_per_s']:>12.3f}"
          f"{two['sources_per_s'] / one['sources_per_s']:>8.2f}x")
    print(f"{'curation: frames/s (1 vs 2 nodes)':<44}{one['frames_per_s']:>12.1f}{two['frames_per_s']:>12.1f}"
          f"{two['frames_per_s'] / one['frames_per_s']:>8.2f}x")
    print(f"{'curation: wall s':<44}{one['wall_s']:>12.1f}{two['wall_s']:>12.1f}")
    print(f"{'training: samples/s (1 vs 2 DDP workers)':<44}{training[1]['samples_per_s']:>12.2f}"
          f"{training[2]['samples_per_s']:>12.2f}{training[2]['samples_per_s'] / training[1]['samples_per_s']:>8.2f}x")
    print(f"{one['sources']} sources, {one['frames']} frames; nodes used: {one['nodes_used']} / {two['nodes_used']}; "
          f"{os.cpu_count()} CPUs, nodes {'pinned to cores of their own' if pin else 'not pinned'}, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")


if __name__ == "__main__":
    main()
