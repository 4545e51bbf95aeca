"""Scorer actor pools on a real local Ray: same results as in-process, one model load per actor,
batching and queue statistics, placement rules for CPU and GPU clusters."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

from common.requests import RequestError, build, deep_merge, merge
from curation.actors import AnnotateReport, annotate, check_cluster_fits, plan_placement, start_pools
from curation.scorers.config import ActorPoolConfig, ScorersConfig
from curation.types import ClipFrames
from tests.scorer_helpers import real_clips, text_clip, tiny_models, tiny_scorer_overrides


def _config(use_ray: bool, batch_size: int = 3) -> ScorersConfig:
    from curation.config import CurationConfig

    pools = {name: {"pool": {"batch_size": batch_size}} for name in ("text", "clip", "caption")}
    overrides = deep_merge(tiny_scorer_overrides(tiny_models()), {"use_ray": use_ray, **pools})
    return CurationConfig.from_overrides({"scorers": overrides}).scorers


def _clips() -> list[ClipFrames]:
    clips = real_clips(6)
    clips[2].caption = "cyclists on a city street"
    big_text, _ = text_clip("big-text", [("BREAKING NEWS", 2.4, 5, (30, 120)), ("LIVE 24/7", 2.4, 5, (30, 300))])
    return [*clips, big_text, ClipFrames("broken", np.zeros((3, 4, 4, 3), np.uint8))]


def test_actor_pools_match_in_process_scoring(prefect_api, ray_local):
    clips = _clips()
    local = annotate(clips, _config(use_ray=False))
    done: list[str] = []
    report = AnnotateReport()
    remote = annotate(clips, _config(use_ray=True), report=report, on_clip_done=lambda cid, row: done.append(cid))
    assert sorted(done) == sorted(c.clip_id for c in clips)  # each clip reported once, when all scorers finished
    assert set(remote) == set(local)
    for clip_id, row in local.items():
        other = remote[clip_id]
        assert other.get("caption") == row.get("caption")
        for column in ("text_area", "aesthetic_score", "clip_score"):
            assert (row[column] is None) == (other[column] is None), (clip_id, column)
            if row[column] is not None:
                assert other[column] == pytest.approx(row[column], abs=1e-5)
    assert remote["big-text"]["text_area"] > 0.07
    assert len(remote["broken"]["scorer_errors"]) == 3 and remote["broken"]["text_area"] is None
    assert remote["real-0"]["clip_score"] is not None  # CoCa caption fed the CLIP text score
    assert set(report.pools) == {"text", "caption", "clip"}
    for stats in report.pools.values():
        assert stats.actors == 1 and stats.device == "cpu" and stats.clips == len(clips)
        assert stats.batches == math.ceil(len(clips) / 3)
        assert 0 < stats.utilisation <= 1.0 and 0 <= stats.queue_occupancy <= 1.0


def test_producer_waits_only_when_every_actor_queue_is_full(prefect_api, ray_local):
    config = _config(use_ray=True, batch_size=1)
    clips = real_clips(8)
    pools = start_pools(["text"], config)
    try:
        pools["text"].config = replace(pools["text"].config, max_batches_in_flight=1)
        tight = AnnotateReport()
        annotate(clips, config, names=["text"], report=tight, pools=pools)
        pools["text"].config = replace(pools["text"].config, max_batches_in_flight=100)
        loose = AnnotateReport()
        annotate(clips, config, names=["text"], report=loose, pools=pools)
    finally:
        pools["text"].close()
    assert tight.pools["text"].blocked_submissions > 0 and tight.producer_blocked_s > 0
    assert loose.pools["text"].blocked_submissions == 0 and loose.producer_blocked_s == 0


def test_no_active_scorer_still_consumes_every_clip():
    config = build(ScorersConfig, {"use_ray": False, "text": {"enabled": False}})
    seen = []

    def produce():
        for clip in real_clips(3):
            seen.append(clip.clip_id)
            yield clip

    report = AnnotateReport()
    assert annotate(produce(), config, report=report) == {c: {} for c in seen}
    assert len(seen) == 3 and set(report.unavailable) == {"clip", "caption", "video_caption", "llm_summary"}


def test_placement_shares_gpus_between_pools_and_fits_cpu_reservations():
    config = ScorersConfig()
    gpu = plan_placement(["text", "clip", "caption"], config, {"GPU": 2.0, "CPU": 32.0})
    # PP-OCR on the CPU onnxruntime wheel gets no GPU; CLIP and CoCa share the two GPUs
    assert gpu["text"].num_gpus == 0 and gpu["text"].num_actors == 1
    assert gpu["clip"].num_gpus == 0.5 and gpu["clip"].num_actors == 2 and gpu["caption"].num_actors == 2
    assert sum(p.num_actors * p.num_gpus for p in gpu.values()) <= 2.0
    craft = merge(config, {"text": {"backend": "craft"}})  # CRAFT is torch: it takes its GPU share
    gpu = plan_placement(["text", "clip", "caption"], craft, {"GPU": 3.0, "CPU": 32.0})
    assert gpu["text"].num_gpus == 0.25 and gpu["text"].num_actors == 4 and gpu["clip"].num_actors == 2
    cpu = plan_placement(["text", "clip", "caption"], config, {"CPU": 2.0})
    assert all(p.num_gpus == 0 and p.num_actors == 1 for p in cpu.values())
    assert sum(p.num_cpus for p in cpu.values()) <= 1.0  # half the CPUs stay with decode
    config = replace(config, clip=replace(config.clip, pool=ActorPoolConfig(num_actors=4, num_gpus=1.0)))
    with pytest.raises(ValueError, match=r"num_actors / num_gpus"):
        plan_placement(["clip"], config, {"GPU": 2.0, "CPU": 8.0})



def test_a_cluster_too_small_for_the_pools_and_a_source_task_is_refused_naming_the_pools():
    """One node with one CPU: the pools are scaled to half a CPU, and a curate-batch task (one CPU) could never
    start, so curation would wait forever at 0 sources. It is refused up front instead, naming the pools."""
    config = ScorersConfig()
    with pytest.raises(ValueError) as refused:
        plan_placement(["text", "clip"], config, {"CPU": 1.0})
    message = str(refused.value)
    assert "\n" not in message and "1 CPU(s)" in message and "text: 1 x" in message and "clip: 1 x" in message
    assert "curate-batch task needs 1" in message
    fitted = plan_placement(["text", "clip"], config, {"CPU": 2.0})  # two CPUs: one for the pools, one for a task
    assert 2.0 - sum(p.num_actors * p.num_cpus for p in fitted.values()) >= 1.0
    config = merge(config, {"clip": {"pool": {"num_actors": 3, "num_cpus": 1.0}}})  # many actors: scaled, a task fits
    scaled = plan_placement(["clip"], config, {"CPU": 4.0})
    assert 4.0 - sum(p.num_actors * p.num_cpus for p in scaled.values()) >= 1.0
    # an autoscaling cluster at zero workers (a head with num-cpus 0) lists no CPU yet: not refused
    assert plan_placement(["text", "clip"], ScorersConfig(), {"memory": 1e9})
    assert plan_placement(["text", "clip"], ScorersConfig(), {"CPU": 0.0})


def test_a_cluster_address_is_checked_for_fit_before_any_work(monkeypatch):
    """`lvd curate --ray-address` asks the cluster's GCS for its resources (no driver connection) and refuses one
    the pools cannot share with a curate-batch task as a one-line RequestError (exit 2); nothing is asked where
    no cluster is named or the scorers run in process. (End to end on a real 1-CPU node: test_ray_start_node.py.)"""
    import infra.local

    asked: list[str] = []

    def resources(address: str) -> dict[str, float]:
        asked.append(address)
        return {"CPU": 1.0 if address.startswith("small") else 2.0}

    monkeypatch.setattr(infra.local, "ray_cluster_resources", resources)
    config = ScorersConfig()
    assert config.active(), "no scorer on actors by default: nothing would be checked"
    with pytest.raises(RequestError) as refused:
        check_cluster_fits(config, "small:6379")
    assert "\n" not in str(refused.value) and "1 CPU(s)" in str(refused.value)
    check_cluster_fits(config, "big:6379")
    check_cluster_fits(config, None)
    check_cluster_fits(merge(config, {"use_ray": False}), "small:6379")
    assert asked == ["small:6379", "big:6379"]


def test_pool_settings_are_validated():
    """Pools are frozen: a bad batch size can only come in through a new instance, which is checked."""
    from curation.config import CurationConfig

    config = ScorersConfig()
    with pytest.raises(FrozenInstanceError):
        config.text.pool.batch_size = 0  # type: ignore[misc]
    with pytest.raises(RequestError, match=r"^batch_size must be >= 1, got 0$"):
        replace(config.text.pool, batch_size=0)
    with pytest.raises(RequestError, match=r"^setting scorers\.text\.pool\.batch_size must be >= 1, got 0$"):
        CurationConfig.from_overrides({"scorers": {"text": {"pool": {"batch_size": 0}}}})
