"""The on-disk contract (dataformat/) on a real curated run of the sample footage."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dataformat import (
    CAPTION_MIX,
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    Column,
    RunLayout,
    SampleKey,
    atomic_write,
    check_caption_mix,
    clip_id,
    find_shards,
    index_shards,
    pick_caption,
    read_shard_samples,
    source_id,
    training_caption,
    video_frames_path,
)


def _same(a, b) -> bool:
    """Equality where NaN equals NaN (a float score may be NaN in both places)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def test_every_shard_sample_json_is_exactly_its_manifest_row(curated_dir):
    layout = RunLayout(curated_dir)
    table = pq.read_table(layout.manifest)
    assert table.schema.names == list(MANIFEST_COLUMNS) and table.schema.equals(MANIFEST_SCHEMA)
    kept = {row[Column.KEY]: row for row in table.to_pylist() if row[Column.KEEP]}
    assert kept, "the sample footage keeps some clips"
    seen = {}
    for shard in find_shards(curated_dir):
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            seen[sample["__key__"]] = json.loads(sample[SampleKey.META])
            assert sample[SampleKey.VIDEO][4:8] == b"ftyp", "KEY.mp4 is an MP4 file"
    assert set(seen) == set(kept)
    for key, payload in seen.items():
        row = kept[key]
        assert list(payload) == sorted(MANIFEST_COLUMNS), f"{key}: KEY.json columns differ from the manifest's"
        different = [name for name in MANIFEST_COLUMNS if not _same(payload[name], row[name])]
        assert not different, f"{key}: KEY.json differs from its manifest row in {different}"
        assert payload[Column.CLIP_METHOD] in ("exact-copy", "reencode")
        rolls = (Column.PRE_ROLL_FRAMES, Column.POST_ROLL_FRAMES, Column.PRE_ROLL_BYTES, Column.POST_ROLL_BYTES)
        assert all(payload[name] >= 0 for name in rolls)
        assert row[Column.SHARD].startswith("shards/") and row[Column.SHARD].endswith(".tar")


def test_seekable_index_reads_what_webdataset_reads(curated_dir):
    shards = find_shards(curated_dir)
    for shard in shards:
        ours = list(read_shard_samples(shard))
        theirs = list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
        assert [s["key"] for s in ours] == [s["__key__"] for s in theirs]
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine["mp4"] == reference[SampleKey.VIDEO]
            assert mine["json"] == json.loads(reference[SampleKey.META])
            assert mine["txt"] == (reference[SampleKey.TEXT].decode() if SampleKey.TEXT in reference else None)
    indexed = index_shards(shards)
    assert all(sample.is_video and sample.video_extension == SampleKey.VIDEO for sample in indexed)


def test_run_layout_names_the_files_a_run_writes(curated_dir):
    layout = RunLayout(curated_dir)
    for path in (layout.config, layout.manifest, layout.summary, layout.sources, layout.clip_rows, layout.clips,
                 layout.frames, layout.shards):
        assert path.exists(), path
    # every clip and frame file of the run is a path the layout names
    named = set()
    for row in pq.read_table(layout.manifest).to_pylist():
        sid = source_id(row["source"])
        assert row["clip_id"].startswith(clip_id(sid, 0)[:-4])
        named |= {layout.clips / sid / f"{row['clip_id']}.mp4", layout.clip_frames(sid, row["clip_id"]),
                  video_frames_path(layout.clip_frames(sid, row["clip_id"]))}
    written = {p for p in (*layout.clips.rglob("*"), *layout.frames.rglob("*")) if p.is_file()}
    assert written and written <= named, sorted(written - named)[:3]
    summary = json.loads(layout.summary.read_text())
    assert summary["shards"] == sorted(p.name for p in layout.shards.glob("*.tar"))
    assert "filters" in json.loads(layout.config.read_text())


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "old")
    assert target.read_text() == "old"
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"

    def broken(handle) -> None:
        handle.write(b"half of the new cont")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_concurrent_atomic_writers_never_share_a_temporary_and_readers_see_old_or_new(tmp_path):
    target = tmp_path / "manifest.bin"
    old = b"o" * 1_000_000
    atomic_write(target, old)
    payloads = [bytes([65 + i]) * 1_000_000 for i in range(2)]
    both_writing = threading.Barrier(2)
    both_listed = threading.Barrier(2)
    temporaries_while_writing: list[set[str]] = []
    seen: list[bytes] = []
    stop = threading.Event()

    def writer(payload: bytes):
        def write(handle) -> None:
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            both_writing.wait(timeout=120)  # both writers are now half-way through their own temporary file
            temporaries_while_writing.append({p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")})
            both_listed.wait(timeout=120)  # neither renames its temporary before the other has looked
            handle.write(payload[len(payload) // 2 :])
        return write

    def reader() -> None:
        while not stop.is_set():
            seen.append(target.read_bytes())

    threads = [threading.Thread(target=atomic_write, args=(target, writer(p))) for p in payloads]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert all(len(names) == 2 for names in temporaries_while_writing), temporaries_while_writing
    assert target.read_bytes() in payloads
    assert all(content in (old, *payloads) for content in seen), "a reader saw a torn or mixed file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_caption_mix_draws_half_coca_and_renormalises_over_present_captions():
    rng = np.random.default_rng(0)
    full = {"coca": "c", "video": "v", "llm_summary": "l"}
    draws = [pick_caption(full, rng) for _ in range(8000)]
    assert draws.count("c") / len(draws) == pytest.approx(CAPTION_MIX["coca"], abs=0.03)
    assert draws.count("v") / len(draws) == pytest.approx(0.25, abs=0.03)
    assert draws.count("l") / len(draws) == pytest.approx(0.25, abs=0.03)
    only_two = [pick_caption({"coca": "c", "video": None, "llm_summary": "l"}, rng) for _ in range(6000)]
    assert only_two.count("c") / len(only_two) == pytest.approx(2 / 3, abs=0.03)
    assert pick_caption({"coca": None, "video": None, "llm_summary": None}, rng) is None
    assert pick_caption(None, rng) is None
    assert pick_caption(full, rng, {"coca": 0.0, "video": 1.0}) == "v"
    # the trainer's fallbacks: the `caption` column, then the sample's .txt, then no text
    assert training_caption({Column.CAPTIONS: {"video": "v"}, Column.CAPTION: "c"}, "t", rng) == "v"
    assert training_caption({Column.CAPTION: "fallback"}, "txt", rng) == "fallback"
    assert training_caption({}, "from txt", rng) == "from txt"
    assert training_caption({}, None, rng) == ""
    with pytest.raises(ValueError, match="caption mix"):
        check_caption_mix({"coca": 0.5, "whisper": 0.5})
    with pytest.raises(ValueError, match="caption mix"):
        check_caption_mix({"coca": -1.0, "video": 2.0})
