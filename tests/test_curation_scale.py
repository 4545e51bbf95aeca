"""Curation at LVD scale: the input listing streams, sources go to task runs in batches, and the run's
Parquet datasets are readable while being written."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from curation.dataset import discover_sources
from curation.listing import batch_size, pending_sources, source_batches
from dataformat import SOURCES_SCHEMA, RunLayout, write_parquet_atomic
from infra.window import BoundedWindow

FILES_PER_DIRECTORY = 1000


class GeneratedListing(AbstractFileSystem):
    """A bucket of video objects (`lvdgen://<N>` holds N prefixes of 1000) whose listing is made up on demand,
    one prefix at a time, like an object store's: nothing holds the whole listing unless the reader builds it."""

    protocol = "lvdgen"
    root_marker = ""

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        if "/" not in path:
            entries = [{"name": f"{path}/d{d:04d}", "type": "directory", "size": 0} for d in range(int(path))]
        else:
            entries = [{"name": f"{path}/clip{f:04d}.mp4", "type": "file", "size": 1}
                       for f in reversed(range(FILES_PER_DIRECTORY))]  # stores need not list in order
            entries.append({"name": f"{path}/notes.txt", "type": "file", "size": 1})
        return entries if detail else [entry["name"] for entry in entries]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        kind = "file" if path.endswith((".mp4", ".txt")) else "directory"
        return {"name": path, "type": kind, "size": 1 if kind == "file" else 0}


def _streamed(directories: int) -> tuple[int, int, int]:
    """(sources, batches, peak traced bytes) of discovering and batching a generated listing."""
    tracemalloc.start()
    try:
        count = batches = 0
        for batch in source_batches(discover_sources(f"lvdgen://{directories}", (".mp4",)), 1000):
            count, batches = count + len(batch), batches + 1
        return count, batches, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Measured in a fresh interpreter: tracemalloc counts the allocations of every thread, and a pytest worker also
# runs the background threads of Prefect's clients and of a local Ray driver (one such run read 424 KB and 674 KB).
_MEASURE_IN_A_FRESH_PROCESS = """
import json
import fsspec
from tests.test_curation_scale import GeneratedListing, _streamed
fsspec.register_implementation("lvdgen", GeneratedListing, clobber=True)
print(json.dumps([_streamed(20), _streamed(200)]))
"""


def test_the_listing_streams_in_memory_that_does_not_grow_with_its_size(tmp_path):
    fsspec.register_implementation("lvdgen", GeneratedListing, clobber=True)
    measured = subprocess.run([sys.executable, "-c", _MEASURE_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                              timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert measured.returncode == 0, measured.stderr[-3000:]
    small, large = json.loads(measured.stdout.strip().splitlines()[-1])  # 20k and 200k objects (~16 MiB as a list)
    assert small[:2] == [20_000, 20] and large[:2] == [200_000, 200]
    assert large[2] < 1.5 * small[2] and large[2] < 2**21, f"peaks {small[2]} and {large[2]} bytes"
    # Resume streams too: one file check per source against OUT's committed source rows.
    layout = RunLayout(tmp_path)
    for relative_path in ("clip0001.mp4", "clip0999.mp4"):
        write_parquet_atomic([{"source": relative_path, "status": "ok"}], SOURCES_SCHEMA,
                             layout.source_part(relative_path))
    pending = list(pending_sources(layout, discover_sources("lvdgen://1/d0000", (".mp4",))))
    assert len(pending) == 998 and pending[:2] == ["clip0000.mp4", "clip0002.mp4"] and pending[-1] == "clip0998.mp4"


def test_local_discovery_streams_in_sorted_path_order_without_following_linked_directories(tmp_path):
    for relative_path in ("b/z.mp4", "b-c.mp4", "a.MP4", "b/a/x.mp4", "notes.txt"):
        (tmp_path / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative_path).write_bytes(b"")
    (tmp_path / "linked").symlink_to(tmp_path / "b")
    (tmp_path / "broken.mp4").symlink_to(tmp_path / "missing.mp4")  # becomes an error row, as before
    found = discover_sources(tmp_path, (".mp4",))
    assert next(found) == "a.MP4"
    rest = list(found)
    assert rest == ["b-c.mp4", "b/a/x.mp4", "b/z.mp4", "broken.mp4"]
    assert ["a.MP4", *rest] == sorted(["a.MP4", *rest])


def test_batches_fill_every_worker_on_small_runs_and_are_full_on_large_ones():
    assert [len(b) for b in source_batches(map(str, range(19)), 8)] == [8, 8, 3]
    assert batch_size(pending=5, workers=2, sources_per_task=8) == 3
    assert batch_size(pending=10**6, workers=64, sources_per_task=8) == 8
    assert batch_size(pending=0, workers=4, sources_per_task=8) == 1
    with pytest.raises(ValueError, match="at least 1"):
        next(source_batches(["a"], 0))


def test_the_window_submits_lazily_keeps_at_most_its_limit_in_flight_and_retries_first():
    pulled: list[int] = []

    def items():
        for item in range(10):
            pulled.append(item)
            yield item

    in_flight: set[int] = set()
    most = 0

    def submit(item):
        nonlocal most
        in_flight.add(item)
        most = max(most, len(in_flight))
        return item

    def first_done(futures):  # the newest finishes first: completion order differs from submission order
        return len(futures) - 1

    window = BoundedWindow(items(), submit, 3, first_done)
    finished = []
    for item, _ in window:
        in_flight.discard(item)
        assert len(pulled) <= len(finished) + 3  # the input is read only as far as the window reaches
        finished.append(item)
        if item == 4:
            window.retry_first([40, 41])
    assert most == 3 and window.peak_in_flight == 3 and window.submitted == 12
    assert sorted(finished) == sorted([*range(10), 40, 41]) and finished[:2] == [2, 3]
    with pytest.raises(ValueError, match="at least 1"):
        BoundedWindow([], submit, 0, first_done)
