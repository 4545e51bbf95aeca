"""A run killed with SIGKILL at any moment and rerun ends exactly-once: sources, manifest, shards."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dataformat import read_parquet_rows, read_shard_samples

pytestmark = pytest.mark.slow  # kills and reruns a curation subprocess many times

RUNNER = """
import sys
from curation.dataset import run_sequential, finalize, prepare_output
from curation.config import CurationConfig
print("READY", flush=True)
if sys.argv[3] == "finalize":
    config = CurationConfig()
    for _ in range(50):
        finalize(prepare_output(sys.argv[2], config), config)
else:
    run_sequential(sys.argv[1], sys.argv[2])
"""


def _run_and_kill(videos: Path, out: Path, mode: str, delay: float) -> int | None:
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(videos), str(out), mode],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "READY"
    try:
        return process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return None


def _assert_exactly_once(videos: Path, out: Path) -> None:
    sources = read_parquet_rows(out / "sources.parquet")
    names = Counter(row["source"] for row in sources)
    assert set(names) == {p.name for p in videos.iterdir()} and set(names.values()) == {1}
    manifest = read_parquet_rows(out / "manifest.parquet")
    assert len({m["clip_id"] for m in manifest}) == len(manifest)
    kept = sorted(m["key"] for m in manifest if m["keep"])
    in_shards = sorted(s["key"] for shard in sorted((out / "shards").glob("*.tar")) for s in read_shard_samples(shard))
    assert kept and in_shards == kept
    leftovers = [p for p in out.rglob(".*")]
    assert leftovers == [], leftovers


def test_sigkill_at_any_point_then_rerun_is_exactly_once(sample_dir, tmp_path):
    videos, out = sample_dir / "videos", tmp_path / "run"
    finished = None
    for delay in (0.1, 0.6, 1.3, 2.2):
        finished = _run_and_kill(videos, out, "full", delay)
        if finished is not None:
            break
    if finished is None:
        finished = _run_and_kill(videos, out, "full", 60)
    assert finished == 0
    _assert_exactly_once(videos, out)
    # Kill while finalize is rewriting shards and the manifest, repeatedly.
    for delay in (0.03, 0.2, 0.45):
        assert _run_and_kill(videos, out, "finalize", delay) is None
    assert _run_and_kill(videos, out, "full", 60) == 0
    _assert_exactly_once(videos, out)
