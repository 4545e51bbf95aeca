"""Training on real curated sample clips, in-process (no Ray): data stream, stages, trainer behaviour."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from dataformat import DataError, find_shards, index_shards, training_caption
from model.edm import LogNormalNoise
from model.loading import load_pipeline
from model.unet import is_temporal_parameter
from training.data import TrainingStream, plan_micro_batches
from training.loop import group_steps
from training.stages import Phase, get_stage_preset
from training.trainer import StageTrainer, position_generators, trainable_names


@pytest.fixture(scope="module")
def samples(curated_dir):
    return index_shards(find_shards(str(curated_dir)))


def _tensors_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# --- stages as data -----------------------------------------------------------------------------------


def test_svd_presets_carry_the_papers_stage_table():
    one, two, three = (get_stage_preset(s, "svd") for s in (1, 2, 3))
    assert one.init == "stabilityai/stable-diffusion-2-1"
    assert [(p.iterations, p.trainable, p.image_only) for p in one.phases] == [
        (1_000, "time_embedding", True), (30_000, "all", True)]
    assert (one.phases[1].p_mean, one.phases[1].p_std) == (-1.2, 1.0)
    assert [(p.height, p.width, p.num_frames, p.iterations, p.batch_size, p.learning_rate) for p in two.phases] == [
        (256, 384, 14, 150_000, 1536, 1e-4), (320, 576, 14, 100_000, 768, 1e-4)]
    assert two.phases[1].p_mean == 0.0 and two.text_drop_rate == 0.15
    (high,) = three.phases
    assert (high.height, high.width, high.iterations, high.batch_size, high.learning_rate) == (
        576, 1024, 50_000, 768, 3e-5)
    assert (high.p_mean, high.p_std, three.ema_decay) == (0.5, 1.4, 0.9999)
    # tiny keeps the structure
    for stage in (1, 2, 3):
        svd, tiny = get_stage_preset(stage, "svd"), get_stage_preset(stage, "tiny")
        assert [(p.trainable, p.image_only, p.p_mean) for p in svd.phases] == [
            (p.trainable, p.image_only, p.p_mean) for p in tiny.phases]
        assert (svd.ema_decay is None) == (tiny.ema_decay is None)


@pytest.mark.parametrize("stage", [0, 4, "2", True, None])
def test_bad_stage_is_a_clear_error(stage):
    with pytest.raises(ValueError, match="stage must be 1"):
        get_stage_preset(stage)


def test_max_steps_keeps_every_phase():
    cut = get_stage_preset(2, "svd").with_max_steps(10)
    assert cut.total_steps == 10 and len(cut.phases) == 2 and all(p.iterations >= 1 for p in cut.phases)
    with pytest.raises(ValueError, match="less than"):
        get_stage_preset(1).with_max_steps(1)


# --- data ---------------------------------------------------------------------------------------------


def test_data_is_sharded_by_worker_without_changing_the_batches(samples):
    preset = get_stage_preset(2)
    whole = list(plan_micro_batches(preset, rank=0, world_size=1, micro_batch_size=2))
    halves = [list(plan_micro_batches(preset, rank=r, world_size=2, micro_batch_size=1)) for r in (0, 1)]
    for step_plan, first, second in zip(whole, halves[0], halves[1], strict=True):
        assert step_plan.step == first.step == second.step
        assert sorted(first.positions + second.positions) == list(step_plan.positions)
    stream = TrainingStream(samples, preset, seed=3, micro_batch_size=2)
    one = [stream.example(p, preset.phases[0]) for p in (0, 1)]
    again = [stream.example(p, preset.phases[0]) for p in (0, 1)]
    assert all(torch.equal(a["pixels"], b["pixels"]) and a["fps"] == b["fps"] for a, b in zip(one, again, strict=True))


def test_loader_workers_and_resume_read_the_same_stream(samples):
    preset = get_stage_preset(2).with_max_steps(4)
    stream = TrainingStream(samples, preset, seed=0, micro_batch_size=1)
    from training.data import training_loader

    serial = list(training_loader(stream, num_workers=0))
    parallel = list(training_loader(stream, num_workers=2))
    assert [b["keys"] for b in serial] == [b["keys"] for b in parallel]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(serial, parallel, strict=True))
    resumed = list(TrainingStream(samples, preset, seed=0, micro_batch_size=1, start_step=2))
    tail = [b for b in serial if b["step"] >= 2]
    assert [b["positions"].tolist() for b in resumed] == [b["positions"].tolist() for b in tail]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, tail, strict=True))


def test_clip_examples_follow_the_spec(samples, curated_dir):
    preset = get_stage_preset(2)
    phase = preset.phases[1]
    stream = TrainingStream(samples, preset, seed=0)
    manifest = {json.loads(json.dumps(r))["key"]: r for r in _manifest_rows(curated_dir)}
    fps_seen = set()
    for position in range(24):
        example = stream.example(position, phase)
        assert example["pixels"].shape == (phase.num_frames, 3, phase.height, phase.width)
        assert example["pixels"].min() >= -1.0 and example["pixels"].max() <= 1.0
        row = manifest[example["key"]]
        assert example["fps"] in {round(row["fps"] / s) for s in preset.frame_strides}
        assert example["motion"] is not None and example["motion_bucket"] == preset.motion.bucket(example["motion"])
        fps_seen.add(example["fps"])
    assert len(fps_seen) > 1, "fps conditioning must vary with the sampled stride, not be hard-coded"
    image = stream.example(0, get_stage_preset(1).phases[1])
    assert image["pixels"].shape == (1, 3, 64, 64)


def _manifest_rows(curated_dir):
    import pyarrow.parquet as pq

    return [r for r in pq.read_table(curated_dir / "manifest.parquet").to_pylist() if r["keep"]]


def test_caption_mix_and_text_dropout():
    rng = np.random.default_rng(0)
    meta = {"captions": {"coca": "a", "video": "b", "llm_summary": "c"}}
    mix = get_stage_preset(2).caption_mix
    drawn = [training_caption(meta, None, rng, mix) for _ in range(4000)]
    shares = {c: drawn.count(c) / len(drawn) for c in "abc"}
    assert abs(shares["a"] - 0.5) < 0.03 and abs(shares["b"] - 0.25) < 0.03 and abs(shares["c"] - 0.25) < 0.03
    assert training_caption({"captions": {"coca": None, "video": "v"}}, None, rng, mix) == "v"
    assert training_caption({"caption": "fallback"}, "txt", rng, mix) == "fallback"
    assert training_caption({}, "from txt", rng, mix) == "from txt"


@pytest.fixture(scope="module")
def image_text_shard(sample_dir, tmp_path_factory):
    """An image-text shard (jpg + txt + json, as LAION-style data comes) from real frames of the sample footage."""
    import io

    import av
    import cv2

    path = tmp_path_factory.mktemp("images") / "images-000000.tar"
    with av.open(str(sample_dir / "videos" / "bikes.mp4")) as container, tarfile.open(path, "w") as archive:
        for index, frame in enumerate(container.decode(video=0)):
            if index % 10 or index >= 60:
                continue
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frame.to_ndarray(format="rgb24"), cv2.COLOR_RGB2BGR))
            files = {"jpg": jpg.tobytes(), "txt": f"frame {index} of a street scene".encode(),
                     "json": json.dumps({"captions": {"coca": f"coca {index}", "video": None}}).encode()}
            for extension, payload in files.items():
                info = tarfile.TarInfo(f"{index:06d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


def test_image_text_shards_feed_stage_one_and_text_is_dropped_15_percent(image_text_shard):
    preset = get_stage_preset(1)
    samples = index_shards(find_shards(str(image_text_shard)))
    assert len(samples) == 6 and all(s.is_image and not s.is_video for s in samples)
    stream = TrainingStream(samples, preset, seed=0)
    captions = [stream.example(position, preset.phases[1])["caption"] for position in range(600)]
    dropped = captions.count("") / len(captions)
    assert abs(dropped - preset.text_drop_rate) < 0.04, dropped
    assert all(c == "" or c.startswith("coca ") for c in captions), "CoCa captions win over the .txt when present"
    with pytest.raises(DataError, match="video phases need clips"):
        TrainingStream(samples, get_stage_preset(2), seed=0)


def test_missing_and_corrupt_shards_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no WebDataset shards"):
        find_shards(str(tmp_path))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="not a readable tar"):
        index_shards(find_shards(str(tmp_path)))
    images_only = tmp_path / "images.tar"
    with tarfile.open(images_only, "w") as archive:
        archive.add(__file__, arcname="x.txt")
    with pytest.raises(DataError, match="no training samples"):
        TrainingStream(index_shards([str(images_only)]), get_stage_preset(2), seed=0)


# --- trainer ------------------------------------------------------------------------------------------


@torch.no_grad()
def _fixed_noise_loss(trainer: StageTrainer, batches: list[dict], sigmas=(0.1, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Mean loss at fixed noise levels and fixed noise: comparable across steps, unlike the training loss."""
    trainer.unet.eval()
    try:
        losses = [trainer.per_sample_loss(batch, trainer.preset.phase_at(batch["step"])[0], sigma).mean().item()
                  for batch in batches for sigma in sigmas]
    finally:
        trainer.unet.train()
    return float(np.mean(losses))


@pytest.mark.parametrize(("p_mean", "p_std"), [(1.0, 1.6), (0.7, 1.6), (-1.2, 1.0)])
def test_training_noise_levels_are_the_phases_log_normal_drawn_per_position(p_mean, p_std):
    noise = LogNormalNoise(p_mean, p_std)
    positions = torch.arange(20_000)
    sigmas, _ = noise.sample_each(position_generators(3, 7, positions), (1,))
    assert abs(sigmas.log().mean().item() - p_mean) < 0.05 and abs(sigmas.log().std().item() - p_std) < 0.05
    # per (seed, position): two workers taking every other position draw exactly what one worker draws
    whole_sigma, whole_noise = noise.sample_each(position_generators(3, 7, positions[:8]), (2, 3))
    halves = [noise.sample_each(position_generators(3, 7, positions[start:8:2]), (2, 3)) for start in (0, 1)]
    assert torch.equal(whole_sigma[0::2], halves[0][0]) and torch.equal(whole_sigma[1::2], halves[1][0])
    assert torch.equal(whole_noise[1::2], halves[1][1])
    assert not torch.equal(whole_sigma, noise.sample_each(position_generators(4, 7, positions[:8]), (2, 3))[0])


def test_the_trainer_draws_each_samples_sigma_from_its_phases_noise(samples):
    preset = replace(get_stage_preset(2), phases=(Phase("noise", 64, 64, 4, 2, 1, 1e-4, 0.7, 1.6),))
    trainer = StageTrainer(load_pipeline("tiny"), preset, seed=5)
    assert (trainer.losses["noise"].noise.p_mean, trainer.losses["noise"].noise.p_std) == (0.7, 1.6)
    batch = list(group_steps(TrainingStream(samples, preset, seed=5, micro_batch_size=1)))[1][0]
    (sigma,), _ = trainer.losses["noise"].noise.sample_each(position_generators(5, 7, batch["positions"]), (1,))
    with torch.no_grad():
        drawn = trainer.per_sample_loss(batch, preset.phases[0])
        assert torch.equal(drawn, trainer.per_sample_loss(batch, preset.phases[0], sigma.item()))
        assert not torch.equal(drawn, trainer.per_sample_loss(batch, preset.phases[0], 2 * sigma.item()))


@pytest.mark.slow  # among the slowest of the suite (--durations); make test-fast skips it
def test_tiny_model_overfits_a_few_real_clips(samples):
    preset = replace(get_stage_preset(2), text_drop_rate=0.0,
                     phases=(Phase("overfit", 64, 64, 6, 30, 2, 2e-3, -1.2, 1.2),))
    stream = TrainingStream(samples[:2], preset, seed=0, micro_batch_size=2)
    trainer = StageTrainer(load_pipeline("tiny"), preset)
    steps = list(group_steps(stream))
    probe = [steps[0][0], steps[1][0]]
    before = _fixed_noise_loss(trainer, probe)
    for micro_batches in steps:
        trainer.train_step(micro_batches)
    after = _fixed_noise_loss(trainer, probe)
    assert trainer.step == 30
    assert after < 0.6 * before, f"validation loss {before:.3f} -> {after:.3f}: the model did not learn the clips"


def test_image_batches_leave_temporal_parameters_untouched(samples):
    preset = get_stage_preset(1).with_max_steps(4)  # 1 time-embedding step, then image steps
    trainer = StageTrainer(load_pipeline("tiny"), preset)
    initial = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    steps = list(group_steps(TrainingStream(samples, preset, seed=0, micro_batch_size=4)))
    trainer.train_step(steps[0])  # time-embedding phase
    changed = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, initial[n])}
    assert changed and all(n.startswith(("time_embedding.", "add_embedding.")) for n in changed), changed
    for micro_batches in steps[1:]:
        trainer.train_step(micro_batches)
    temporal = {n for n in initial if is_temporal_parameter(n)}
    assert temporal
    for name, param in trainer.unet.named_parameters():
        if name in temporal:
            assert torch.equal(param, initial[name]), f"{name} moved on image-only batches"
    spatial_moved = [n for n, p in trainer.unet.named_parameters() if n not in temporal
                     and not n.startswith(("time_embedding.", "add_embedding.")) and not torch.equal(p, initial[n])]
    assert spatial_moved, "the image phase must train the spatial layers"


def test_trainable_sets():
    names = ["time_embedding.linear_1.weight", "add_embedding.linear_1.weight", "conv_in.weight",
             "down_blocks.0.resnets.0.temporal_res_block.conv1.weight"]
    image = Phase("p", 64, 64, 1, 1, 1, 1e-4, 0, 1, image_only=True)
    assert trainable_names(names, image) == set(names[:3])
    assert trainable_names(names, replace(image, trainable="time_embedding")) == set(names[:2])
    video = Phase("v", 64, 64, 4, 1, 1, 1e-4, 0, 1, trainable="temporal")
    assert trainable_names(names, video) == {names[3]}


def test_checkpoint_round_trip_continues_identically(samples, tmp_path):
    stage3 = get_stage_preset(3).with_max_steps(4)
    preset = replace(stage3, phases=(replace(stage3.phases[0], height=64, width=64, num_frames=4),))
    steps = list(group_steps(TrainingStream(samples, preset, seed=1, micro_batch_size=2)))
    straight = StageTrainer(load_pipeline("tiny"), preset, seed=1)
    for micro_batches in steps:
        straight.train_step(micro_batches)
    first = StageTrainer(load_pipeline("tiny"), preset, seed=1)
    for micro_batches in steps[:2]:
        first.train_step(micro_batches)
    first.save_state(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 2 * preset.phases[0].batch_size
    second = StageTrainer(load_pipeline("tiny"), preset, seed=1)
    with torch.no_grad():
        for param in second.unet.parameters():  # the checkpoint must overwrite whatever the model holds
            param.add_(0.01)
    second.load_state(tmp_path)
    resumed = list(group_steps(TrainingStream(samples, preset, seed=1, micro_batch_size=2, start_step=2)))
    for micro_batches in resumed:
        second.train_step(micro_batches)
    assert _tensors_equal(straight.unet.state_dict(), second.unet.state_dict())
    assert _tensors_equal(straight.ema.state_dict(), second.ema.state_dict())
    exported = second.export_unet().state_dict()
    assert not _tensors_equal(exported, second.unet.state_dict()), "stage III exports the EMA weights"


def test_a_ray_snapshot_naming_missing_checkpoints_is_set_aside(tmp_path):
    """Ray Train refuses to start on a snapshot that names deleted checkpoints; our resume scan does not need it."""
    from dataformat import RAY_RUN_NAME as RUN_NAME
    from training.loop import drop_stale_ray_snapshot

    run = tmp_path / RUN_NAME
    (run / "checkpoint_a").mkdir(parents=True)
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}]}))
    assert drop_stale_ray_snapshot(tmp_path) is None and snapshot.exists()
    snapshot.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"},
                                                           {"checkpoint_dir_name": "checkpoint_b"}]}))
    stale = drop_stale_ray_snapshot(tmp_path)
    assert stale is not None and stale.exists() and not snapshot.exists()
    snapshot.write_text("{torn")
    assert drop_stale_ray_snapshot(tmp_path) is not None and not snapshot.exists()
    assert drop_stale_ray_snapshot(tmp_path / "nothing-here") is None


def test_a_checkpoint_torn_during_its_copy_is_skipped_for_the_one_before(tmp_path):
    """A kill while Ray copies a checkpoint into storage leaves state.json beside a short unet.safetensors."""
    from safetensors.torch import save_file

    from dataformat import RAY_RUN_NAME as RUN_NAME
    from training.loop import checkpoint_is_complete, latest_checkpoint, write_file_manifest

    directories = {}
    for step in (5, 10):
        directory = tmp_path / RUN_NAME / f"checkpoint_{step:02d}"
        (directory / "pipeline").mkdir(parents=True)
        save_file({"weight": torch.full((64, 64), float(step))}, directory / "unet.safetensors")
        (directory / "pipeline" / "model_index.json").write_text("{}")
        (directory / "state.json").write_text(json.dumps({"step": step}))
        write_file_manifest(directory)
        directories[step] = directory
    assert all(checkpoint_is_complete(d) for d in directories.values())
    assert latest_checkpoint(tmp_path) == directories[10]

    weights = directories[10] / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert not checkpoint_is_complete(directories[10])
    assert latest_checkpoint(tmp_path) == directories[5]
    (directories[5] / "files.json").unlink()  # a manifest not copied yet: as incomplete as a short file
    assert latest_checkpoint(tmp_path) is None


def test_progress_callbacks_run_in_the_callers_context(tmp_path):
    """The poller thread sees the caller's context variables (Prefect's API address and run live there);
    each new step is reported once, and the final step after the block ends."""
    import contextvars
    import threading

    from training.loop import follow_progress

    changed = threading.Condition()
    reads = 0

    class CountedPath(type(tmp_path)):
        """The progress file, counting the poller's reads: "several polls" is a number of reads, not a time."""

        def read_text(self, *args, **kwargs) -> str:
            nonlocal reads
            try:
                return super().read_text(*args, **kwargs)
            finally:
                with changed:
                    reads += 1
                    changed.notify_all()

    run_name = contextvars.ContextVar("run_name", default="no context")
    token = run_name.set("stage-2 run")
    seen: list[tuple[str, int]] = []
    progress = CountedPath(tmp_path / "progress.json")

    def report(update: dict) -> None:
        with changed:
            seen.append((run_name.get(), update["step"]))
            changed.notify_all()

    def write(step: int) -> None:
        (tmp_path / "progress.tmp").write_text(json.dumps({"step": step, "total": 3}))
        (tmp_path / "progress.tmp").replace(progress)

    def wait_until(condition, what: str) -> None:
        with changed:
            assert changed.wait_for(condition, timeout=120), f"no {what} within 120 s"

    try:
        with follow_progress(progress, report, interval_s=0.02):
            write(1)
            wait_until(lambda: any(s == 1 for _, s in seen), "report of step 1")
            polled = reads
            wait_until(lambda: reads >= polled + 3, "three more polls")  # of an unchanged file: nothing new
            write(2)
            wait_until(lambda: any(s == 2 for _, s in seen), "report of step 2")
            write(3)
    finally:
        run_name.reset(token)
    assert seen[:2] == [("stage-2 run", 1), ("stage-2 run", 2)]
    assert {name for name, _ in seen} == {"stage-2 run"}
    assert 1 <= len(seen[2:]) <= 2 and {step for _, step in seen[2:]} == {3}  # by the thread and/or the last poll


class _PicklePayload:
    """Unpickling this runs os.mkdir(marker): the shape of a planted checkpoint file that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_a_planted_checkpoint_cannot_run_code_on_resume(tmp_path):
    """Resume reads RNG state from JSON and tensors with torch's weights-only unpickler: a checkpoint whose
    rng.pt (the pre-JSON format) or optimizer.pt carries a code payload is refused and the payload never runs."""
    import random

    preset = replace(get_stage_preset(3).with_max_steps(1), phases=(replace(get_stage_preset(3).phases[0],
                                                                             height=64, width=64, num_frames=4),))
    trainer = StageTrainer(load_pipeline("tiny"), preset, seed=1)
    good = tmp_path / "good"
    trainer.save_state(good)
    marker = tmp_path / "payload-ran"
    for planted_file in ("rng.pt", "optimizer.pt"):
        planted = tmp_path / planted_file.replace(".", "-")
        planted.mkdir()
        for item in good.iterdir():
            if item.name not in ("rng.json", "rng.pt"):
                (planted / item.name).write_bytes(item.read_bytes())
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   planted / "rng.pt")  # the format older checkpoints have
        torch.save({"state": _PicklePayload(marker)}, planted / planted_file)
        with pytest.raises(ValueError, match="refusing to load"):
            StageTrainer(load_pipeline("tiny"), preset, seed=1).load_state(planted)
        assert not marker.exists(), f"a planted {planted_file} ran its payload"

    assert (good / "rng.json").is_file() and not (good / "rng.pt").exists()
    older = tmp_path / "older"  # an older checkpoint's genuine rng.pt (tensors and numpy arrays only) resumes
    older.mkdir()
    for item in good.iterdir():
        (older / item.name).write_bytes(item.read_bytes())
    (older / "rng.json").unlink()
    expected = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    torch.save({"torch": expected[0], "numpy": np.random.get_state(), "python": expected[2]}, older / "rng.pt")
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    StageTrainer(load_pipeline("tiny"), preset, seed=1).load_state(older)
    assert torch.equal(torch.get_rng_state(), expected[0]) and random.getstate() == expected[2]
    assert np.array_equal(np.random.get_state()[1], expected[1])
