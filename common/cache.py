"""The one cache root of the project: what is built or converted once and reused by later runs.

$LVD_HOME, else $LVD_CACHE_DIR (the older name, still honoured: the FVD feature cache and the I3D weights were
kept there), else ~/.cache/lvd:

    sample/                          the bundled sample set (`lvd curate` / `lvd pipeline` without an input)
    i3d/i3d-kinetics-400.safetensors the converted I3D weights (`lvd i3d-weights`; $LVD_I3D_WEIGHTS overrides)
    fvd/<content hash>.npz           I3D features of real-video folders, by content
    clip-tokenizer/                  the CLIP tokenizer files of the tiny text encoder, built offline
    bench/                           the benchmarks' inputs

Outputs of runs never go here: they go where the run is told (its output directory).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LVD_HOME"
HOME_ENV_ALIAS = "LVD_CACHE_DIR"


def cache_root() -> Path:
    """$LVD_HOME, else $LVD_CACHE_DIR, else ~/.cache/lvd."""
    chosen = os.environ.get(HOME_ENV) or os.environ.get(HOME_ENV_ALIAS)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "lvd"


def sample_cache() -> Path:
    return cache_root() / "sample"


def i3d_cache() -> Path:
    return cache_root() / "i3d"


def fvd_feature_cache() -> Path:
    return cache_root() / "fvd"


def clip_tokenizer_cache() -> Path:
    return cache_root() / "clip-tokenizer"


def benchmark_cache() -> Path:
    return cache_root() / "bench"
