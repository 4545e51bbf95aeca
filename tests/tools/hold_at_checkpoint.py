"""A training run that holds still at its N-th checkpoint until it is killed: a kill "right after the first
checkpoint" that does not race the run, whatever the machine's speed.

`hold_env` returns the environment for such a run: a `sitecustomize` module on PYTHONPATH, which every Python
process of the run imports at start (the CLI, Ray's workers), installs an import hook that wraps
`training.loop.write_file_manifest` once that module is loaded. Rank 0 calls it to seal each checkpoint before Ray
stores the checkpoint; the wrapper blocks the N-th call for good. The run then has exactly its first N - 1
checkpoints in storage and stays alive until the test kills it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

HOLD_AT_CHECKPOINT = "LVD_TEST_HOLD_AT_CHECKPOINT"
ROOT = Path(__file__).resolve().parents[2]


def hold_env(hook_dir: Path, checkpoint: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run that blocks when rank 0 seals its `checkpoint`-th checkpoint (1 = the first)."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text("from tests.tools.hold_at_checkpoint import install\ninstall()\n")
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), str(ROOT), env.get("PYTHONPATH")]))
    env[HOLD_AT_CHECKPOINT] = str(checkpoint)
    return env


def install() -> None:
    """Called by the generated sitecustomize: hook the import of training.loop when the run asks for a hold."""
    if os.environ.get(HOLD_AT_CHECKPOINT):
        sys.meta_path.insert(0, _TrainingLoopHook(int(os.environ[HOLD_AT_CHECKPOINT])))


class _TrainingLoopHook(importlib.abc.MetaPathFinder):
    def __init__(self, checkpoint: int) -> None:
        self.checkpoint = checkpoint

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "training.loop":
            return None
        sys.meta_path.remove(self)  # the real module's spec, found by the finders after this one
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            _hold_at(module, self.checkpoint)

        spec.loader.exec_module = exec_module
        return spec


def _hold_at(module: Any, checkpoint: int) -> None:
    seal = module.write_file_manifest
    sealed = 0

    def write_file_manifest(directory: Path) -> None:
        nonlocal sealed
        sealed += 1
        if sealed >= checkpoint:
            threading.Event().wait()  # held here until the test kills the run
        seal(directory)

    module.write_file_manifest = write_file_manifest
