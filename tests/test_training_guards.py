"""Training refuses what would spoil a run before it touches the output (a second writer into the same root) and
cleans up what a killed run left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataformat import LOCK_NAME, OutputLocked
from flows.cli import main
from training.loop import run_stage
from training.request import StageRunRequest

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys; from dataformat import acquire_output_lock; acquire_output_lock(sys.argv[1]); "
             "print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def held_root(tmp_path: Path):
    """An output root whose writer lock another live process holds (until the test ends), with a finished-looking
    stage directory of that run inside it."""
    root = tmp_path / "runs"
    (root / "stage1").mkdir(parents=True)
    (root / "stage1" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the lock file is written before this line
        yield root, holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_second_train_into_the_same_root_is_refused_in_one_line(held_root, tmp_path: Path, capsys) -> None:
    """`lvd train --restart` into a root another run writes: one line naming the holder, exit 2, and the other
    run's stage directory untouched (before the lock, --restart deleted it)."""
    root, holder = held_root
    data = tmp_path / "data"
    data.mkdir()
    code = main(["train", "--stage", "1", "--data", str(data), "--output-root", str(root), "--restart"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lvd train: error: ") and "is being written by another run" in lines[0]
    assert f"pid {holder.pid}" in lines[0]
    assert (root / "stage1" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'

    request = StageRunRequest.build({"stage": 1, "data": str(data), "output_root": str(root), "resume": False})
    with pytest.raises(OutputLocked, match="is being written by another run"):
        run_stage(request)  # the library entry point holds the same line
    assert (root / "stage1").is_dir()


def test_the_lock_of_a_finished_run_is_taken_over(held_root, tmp_path: Path) -> None:
    """Once the holder is gone, the next run takes the root (the check then moves on to the data)."""
    root, holder = held_root
    holder.stdin.close()
    holder.wait(timeout=60)
    data = tmp_path / "data"
    data.mkdir()
    request = StageRunRequest.build({"stage": 1, "data": str(data), "output_root": str(root)})
    with pytest.raises(Exception, match="no WebDataset shards"):
        request.check_inputs()
    assert (root / LOCK_NAME).exists()  # now held by this process


def test_export_leftovers_of_a_killed_run_are_removed_on_the_next_run(tmp_path: Path, curated_dir: Path) -> None:
    """A kill during the export leaves `stageN/.export-*` (a full copy of the weights); the next run of the stage
    removes it, even when the stage is already done and is skipped."""
    root = tmp_path / "runs"
    stage = root / "stage1"
    (stage / ".export-k1ll3d" / "pipeline" / "unet").mkdir(parents=True)
    (stage / ".export-k1ll3d" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 4096)
    (stage / "done.json").write_text('{"stage": 1, "pipeline": "p"}')
    request = StageRunRequest.build({"stage": 1, "data": str(curated_dir), "output_root": str(root), "init": "tiny"})
    summary = run_stage(request)
    assert summary["skipped"] is True
    assert not list(stage.glob(".export-*")) and (stage / "done.json").exists()
