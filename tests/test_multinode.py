"""A real multi-node Ray cluster on this machine (`infra.local.local_ray_cluster`: `ray start --head` plus
`ray start --address`, loopback, 1 CPU per node): curation and DDP training spread over both nodes, and
survive losing one of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from curation.config import CurationConfig
from curation.dataset import run_sequential
from curation.sample_data import VIDEO_DIR
from dataformat import Column
from flows.cli import main

# Small real sources: 3 ok ones (cuts, a static shot, an odd size) and a bad one (an error row).
SOURCES = ("bikes.mp4", "static_shot.mp4", "odd_161x97.mp4", "empty.mp4")
# No learned scorer: their actors would take a CPU from the two the sources are spread over.
CONFIG = {"scorers": {"text": {"enabled": False}}}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _input_dir(sample_dir: Path, tmp_path: Path, names: tuple[str, ...]) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for name in names:
        shutil.copy(sample_dir / VIDEO_DIR / name, folder / name)
    return folder


def _rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return sorted(({k: v for k, v in row.items() if k not in drop} for row in rows),
                  key=lambda row: (row["source"], row.get(Column.CLIP_ID) or ""))


def _assert_same_as_local_run(out: Path, raw: Path, tmp_path: Path) -> None:
    """Sources and manifest equal those of a sequential in-process run (no Ray), but for the node column."""
    local = tmp_path / "local"
    run_sequential(raw, local, CurationConfig.from_overrides(CONFIG))
    assert _rows(out / "sources.parquet", (Column.NODE_ID,)) == _rows(local / "sources.parquet", (Column.NODE_ID,))
    assert _rows(out / "manifest.parquet") == _rows(local / "manifest.parquet")
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == sorted(
        p.name for p in (local / "shards").glob("*.tar"))


def test_curate_lvd_spreads_sources_over_both_nodes(cluster_driver, prefect_api, sample_dir, tmp_path):
    from flows.curate import curate_lvd

    raw = _input_dir(sample_dir, tmp_path, SOURCES)
    out = tmp_path / "out"
    report = curate_lvd(input_path=str(raw), output_path=str(out), config=CONFIG,
                        ray_address=cluster_driver.address, progress=False)
    assert report["sources"] == len(SOURCES) and report["sources_error"] == 1

    sources = pq.read_table(out / "sources.parquet").to_pylist()
    nodes = {row[Column.NODE_ID] for row in sources}
    cluster_nodes = set(cluster_driver.node_ids())
    assert len(cluster_nodes) == 2 and nodes == cluster_nodes, f"sources ran on {nodes}, cluster has {cluster_nodes}"
    _assert_same_as_local_run(out, raw, tmp_path)


def _unet(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(pipeline_dir) / UNET_WEIGHTS))


def _straight_run(curated_dir: Path, stage: int, max_steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same stage in this process, one worker taking the whole global batch (as micro-batches of 1, like
    the workers): weights and losses."""
    from dataformat import find_shards, index_shards
    from model.loading import load_pipeline
    from training.data import TrainingStream
    from training.loop import group_steps
    from training.stages import get_stage_preset
    from training.trainer import StageTrainer

    torch.set_num_threads(1)
    preset = get_stage_preset(stage).with_max_steps(max_steps)
    trainer = StageTrainer(load_pipeline("tiny"), preset)
    stream = TrainingStream(index_shards(find_shards(str(curated_dir))), preset, seed=0, micro_batch_size=1)
    losses = [trainer.train_step(micro_batches)["loss"] for micro_batches in group_steps(stream)]
    return trainer.unet.state_dict(), losses


def _logged_losses(stage_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in sorted(rows, key=lambda row: row["step"])]

class _NodeKiller(threading.Thread):
    """SIGKILLs the raylet of node `index` as soon as `ready()` holds (polled every 20 ms), as if that machine
    vanished mid-run."""

    def __init__(self, cluster, index: int, ready, timeout_s: float = 600.0) -> None:
        super().__init__(daemon=True)
        self.cluster, self.index, self.ready, self.timeout_s = cluster, index, ready, timeout_s
        self.killed_pid: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.done.is_set() and time.monotonic() < deadline:
            if self.ready():
                self.killed_pid = self.cluster.kill_node(self.index)
                return
            time.sleep(0.02)


def _running(node, task_name: str) -> bool:
    """Whether a Ray worker of `node` is running task `task_name` (Ray titles the process `ray::<task>`)."""
    for pid in node.pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{task_name}".encode()):
                return True
        except OSError:
            continue
    return False


def test_curation_survives_losing_a_node(cluster_driver, prefect_api, sample_dir, tmp_path):
    """The second node dies while it curates a batch: the batch is redone on the head, every source ends up
    committed exactly once and the output equals a local run's."""
    from flows.curate import curate_lvd

    raw = _input_dir(sample_dir, tmp_path, SOURCES)
    out = tmp_path / "out"
    killer = _NodeKiller(cluster_driver, 1, lambda: _running(cluster_driver.nodes[1], "curate-batch"))
    killer.start()
    try:
        report = curate_lvd(input_path=str(raw), output_path=str(out), config=CONFIG,
                            ray_address=cluster_driver.address, progress=False)
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed_pid, "the second node never ran a source"
    assert cluster_driver.nodes[1].raylet_pid() is None
    assert report["sources"] == len(SOURCES)
    sources = [row[Column.SOURCE] for row in pq.read_table(out / "sources.parquet").to_pylist()]
    assert sorted(sources) == sorted(SOURCES), "every source exactly once"
    _assert_same_as_local_run(out, raw, tmp_path)


def test_train_stage_ddp_over_two_nodes_then_on_the_survivor(cluster_driver, curated_dir, tmp_path, monkeypatch):
    """Stage II tiny, global batch 2, one DDP worker (gloo, 1 sample) on each node, elastic down to 1 worker: the
    losses are those of 1 worker with the doubled batch. The second node dies after the step-2 checkpoint; the
    stage goes on from that checkpoint with one worker on the head and ends with the weights of an
    uninterrupted run."""
    import ray

    from training.loop import complete_checkpoints, run_stage
    from training.request import StageRunRequest

    # Ray Train may decide on the restart's size before the GCS has declared the node dead; the start of that
    # too-large group then has to time out (default 60 s) before the group that fits is started
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    root = tmp_path / "train"
    storage = root / "stage2" / "ray"
    killer = _NodeKiller(cluster_driver, 1, lambda: bool(complete_checkpoints(storage)))
    killer.start()
    try:
        result = run_stage(StageRunRequest.build(
            stage=2, data=str(curated_dir), output_root=str(root), init="tiny", max_steps=4, micro_batch_size=1,
            num_workers=2, min_workers=1, checkpoint_every=2, max_failures=3, ray_address=cluster_driver.address))
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed_pid and cluster_driver.nodes[1].raylet_pid() is None
    assert len(cluster_driver.node_ids()) == 1, "the second node is gone: the run ended on the head alone"
    workers = [actor for actor in ray._private.state.actors().values() if "RayTrainWorker" in actor["ActorClassName"]]
    first_group = sorted(workers, key=lambda actor: actor["StartTime"])[:2]
    assert len({actor["Address"]["NodeID"] for actor in first_group}) == 2, "the 2 DDP workers shared a node"
    steps = [json.loads(line)["step"] for line in (root / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 5)), "each step logged once across the restart"

    weights, losses = _straight_run(curated_dir, stage=2, max_steps=4)
    assert _logged_losses(Path(result["output_dir"])) == pytest.approx(losses, rel=1e-4)
    trained = _unet(result["pipeline"])
    for name, value in weights.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=f"{name} differs")


def test_each_node_runs_on_cores_of_its_own(cluster_driver):
    """Pinned nodes (`local_ray_cluster(pin_cores=True)`): a node's tasks run only on its own cores and a
    1-CPU task decodes and encodes on one thread, as on separate 1-core machines."""
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from curation.decode import thread_budget
    from infra.local import ray_init_kwargs

    if cluster_driver.cores is None:
        pytest.skip("fewer than two cores: the nodes share them")

    def where() -> tuple[set[int], int]:
        return os.sched_getaffinity(0), thread_budget()

    ray.init(**ray_init_kwargs(cluster_driver.address))
    task = ray.remote(num_cpus=1)(where)
    for node_id, node in cluster_driver.node_ids().items():
        placed = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        assert ray.get(placed.remote()) == (cluster_driver.node_cores(node.index), 1)


def test_a_driver_joins_a_token_cluster_or_says_in_one_line_what_to_set(ray_cluster, tmp_path, monkeypatch, capsys):
    """`ray start` turns Ray's token authentication on. A driver whose RAY_AUTH_MODE is unset joins it (token mode is
    the default for a driver given an address); one that runs with authentication off gets one line saying to set
    RAY_AUTH_MODE=token before any work, instead of twenty GCS retry warnings and a traceback."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    address = ray_cluster.address
    code = (f"import ray; from infra.local import ray_init_kwargs; ray.init(**ray_init_kwargs({address!r})); "
            "print('CONNECTED', int(ray.cluster_resources()['CPU'])); ray.shutdown()")
    joined = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0 and "CONNECTED 2" in joined.stdout, joined.stderr[-3000:]

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    returncode = main(["curate", str(tmp_path), str(tmp_path / "out"), "--ray-address", ray_cluster.address])
    lines = capsys.readouterr().err.strip().splitlines()
    assert returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lvd curate: error: ") and "set RAY_AUTH_MODE=token" in lines[0]
    assert not (tmp_path / "out").exists()
