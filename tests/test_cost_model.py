"""The LVD cost model's arithmetic (benchmarks/cost_model.py `estimate`) on a case computed by hand.

The measurement half of the benchmark is not run here (it takes minutes); only the pure model is.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cm = load_cost_model()


def hand_case(**changes):
    """1000 clips of 10 s at 30 fps (300 frames each, 300k frames), 250 kept; 2 cpu-decode workers x 4 cores,
    1 gpu worker x 2 GPUs of 1e14 FLOP/s."""
    values = dict(
        dataset=cm.Dataset("hand", clips=1000, kept_clips=250, mean_clip_s=10.0, fps=30.0),
        cpu=(
            cm.CpuCost("decode", 0.001, "frame"),  # 300k frames x 1 ms = 300 core-s
            cm.CpuCost("text", 0.5, "clip"),  # 1000 clips x 0.5 s = 500 core-s
            cm.CpuCost("raft frames", 0.002, "kept_frame"),  # 250 x 300 frames x 2 ms = 150 core-s
        ),
        gpu=(
            cm.GpuCost("clip", 1e12, 0.5, "clip"),  # 1e12 / (1e14 x 0.5) = 0.02 s x 1000 = 20 GPU-s
            cm.GpuCost("raft", 4e12, 0.2, "kept_clip"),  # 4e12 / (1e14 x 0.2) = 0.2 s x 250 = 50 GPU-s
        ),
        cluster=cm.ClusterShape(2, 4, 1, 2, "test", 1e14),
        video_bytes_per_s=1e5,
        sample_overhead_bytes=1000,
        clips_per_source=4,
        sources_per_task_run=100,
    )
    values.update(changes)
    return cm.CostInputs(**values)


def test_estimate_matches_the_hand_computed_case():
    result = cm.estimate(hand_case())
    assert result.frames == 300_000
    assert result.video_hours == pytest.approx(10_000 / 3600)
    assert result.cpu_core_hours == pytest.approx({"decode": 300 / 3600, "text": 500 / 3600, "raft frames": 150 / 3600})
    assert result.total_cpu_core_hours == pytest.approx(950 / 3600)
    assert result.gpu_seconds_per_unit == pytest.approx({"clip": 0.02, "raft": 0.2})
    assert result.gpu_hours == pytest.approx({"clip": 20 / 3600, "raft": 50 / 3600})
    # curate phase: 800 core-s on 8 cores = 100 s vs 20 GPU-s on 2 GPUs = 10 s -> CPU bound
    curate = result.phases["curate"]
    assert curate.cpu_wall_hours == pytest.approx(100 / 3600)
    assert curate.gpu_wall_hours == pytest.approx(10 / 3600)
    assert curate.bottleneck == "cpu-decode"
    assert curate.cores_per_gpu_balanced == pytest.approx(40.0)  # 800 core-s / 20 GPU-s
    # hq phase: 150 core-s / 8 = 18.75 s vs 50 GPU-s / 2 = 25 s -> GPU bound
    hq = result.phases["hq"]
    assert hq.wall_hours == pytest.approx(25 / 3600)
    assert hq.bottleneck == "gpu"
    assert result.wall_hours == pytest.approx(125 / 3600)
    assert result.bottleneck == "cpu-decode"  # the longer phase's
    # 40 cores per GPU x 2 GPUs = 80 cores = 20 workers of 4 cores
    assert result.cpu_workers_balanced == 20
    assert result.gpu_workers_balanced == 1  # 8 cores keep 8 / 40 = 0.2 GPUs busy: one worker of 2
    assert result.input_bytes == pytest.approx(1000 * 10 * 1e5)
    assert result.shard_bytes == pytest.approx(250 * (10 * 1e5 + 1000))
    assert (result.sources, result.task_runs, result.task_runs_unbatched) == (250, 3, 250)


def test_spare_cores_of_the_gpu_workers_share_the_cpu_work():
    # 2 spare cores on the one gpu worker: 10 cores; the curate phase's 800 core-s take 80 s; balancing 2 GPUs
    # needs 80 cores, 2 of them on the gpu worker: 78 / 4 -> 20 cpu-decode workers
    result = cm.estimate(hand_case(cluster=cm.ClusterShape(2, 4, 1, 2, "test", 1e14, spare_cores_per_gpu_worker=2)))
    assert result.phases["curate"].cpu_wall_hours == pytest.approx(80 / 3600)
    assert result.cpu_workers_balanced == 20


def test_no_gpus_means_an_unbounded_gpu_phase_and_bad_inputs_are_refused():
    result = cm.estimate(hand_case(cluster=cm.ClusterShape(2, 4, 0, 8, "test", 1e14)))
    assert math.isinf(result.wall_hours) and result.bottleneck == "gpu"
    with pytest.raises(ValueError, match="kept_clips"):
        cm.estimate(hand_case(dataset=cm.Dataset("bad", 10, 20, 10.0, 30.0)))
    with pytest.raises(ValueError, match="per must be one of"):
        cm.estimate(hand_case(cpu=(cm.CpuCost("x", 1.0, "source"),)))
    with pytest.raises(ValueError, match="utilisation"):
        cm.estimate(hand_case(gpu=(cm.GpuCost("x", 1e12, 1.5, "clip"),)))


def test_lvd_figures_follow_the_recipe():
    # docs/recipe.md §1: 577M clips, 212 years -> 11.6 s per clip; about 300 frames per clip
    assert abs(cm.LVD_MEAN_CLIP_S - 11.6) < 0.05
    lvd, lvd10m = cm.DATASETS
    assert (lvd.clips, lvd.kept_clips, lvd10m.clips, lvd10m.kept_clips) == (577e6, 152e6, 9.8e6, 2.3e6)
    assert lvd.mean_clip_s * lvd.fps == pytest.approx(300)


def test_clip_methods_change_storage_and_training_decode_only_where_measured():
    """Exact copies: clip bytes x1.2 of the shot (pre-/post-roll) and 1.5 ms of decode per shown frame read;
    250 kept clips x 300 frames = 75k frames read per epoch."""
    base = cm.estimate(hand_case())
    assert base.read_core_hours_per_epoch == 0
    copied = cm.estimate(hand_case(clip_bytes_factor=1.2, read_core_s_per_frame=0.0015))
    assert copied.shard_bytes == pytest.approx(250 * (10 * 1e5 * 1.2 + 1000))
    assert copied.read_core_hours_per_epoch == pytest.approx(75_000 * 0.0015 / 3600)
    assert copied.total_cpu_core_hours == base.total_cpu_core_hours  # reading is training's cost, not curation's
    with pytest.raises(ValueError, match="clip_bytes_factor > 0"):
        cm.estimate(hand_case(clip_bytes_factor=0))


def test_method_estimates_swap_in_each_methods_measured_costs():
    measured = {"pixels_per_frame": 100.0, "clip_methods": {"set": {
        "exact-copy": {"clip_write_core_s_per_frame": 0.0001, "clip_bytes_factor": 1.3, "read_core_s_per_frame": 0.002},
        "reencode": {"clip_write_core_s_per_frame": 0.004, "clip_bytes_factor": 2.0, "read_core_s_per_frame": 0.001},
    }}}
    base = hand_case(cpu=(cm.CpuCost("decode", 0.001, "frame"), cm.CpuCost("clip writing", 0.5, "frame")))
    result = cm.method_estimates(measured, base, pixels=200)  # sources of twice the pixels: CPU costs x2
    copy, encode = result[("set", "exact-copy")], result[("set", "reencode")]
    assert copy.cpu_core_hours["clip writing"] == pytest.approx(300_000 * 0.0002 / 3600)
    assert encode.cpu_core_hours["clip writing"] == pytest.approx(300_000 * 0.008 / 3600)
    assert copy.read_core_hours_per_epoch == pytest.approx(75_000 * 0.004 / 3600)
    assert encode.shard_bytes == pytest.approx(250 * (10 * 1e5 * 2.0 + 1000))
    assert "| set / exact-copy |" in cm.method_table(result)
