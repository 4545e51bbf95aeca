"""Building a study: match the videos of every system by what they were generated from, pair them, transcode.

Matching: when every video of every system has its generation record beside it (`dataformat.generation`, written
by the `generate-video` flow), two videos match when they came from the same prompt, the same conditioning
image (by the hash of its bytes) and the same seed; otherwise videos match by file name without extension.
Videos that have no match in every other system are left out and listed in study.json (`unmatched`).

Pairs: for every matched item, every two systems are compared once, each pair shown with a random side for each
system (fixed per pair, from `seed`), so position bias averages out. Pairs are listed item by item with the order
of the system pairs rotated from one item to the next; each rater then sees them in an order of their own
(`evaluation.preference.store`). Gold pairs (`gold`) put a random system's video against its degraded copy.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.requests import RequestError
from dataformat import VIDEO_SUFFIXES
from dataformat.generation import read_generation_record
from dataformat.preference import GOLD_DIR, StudyManifest, StudyPair, write_study
from evaluation.preference.media import degrade, load_video, write_study_video
from evaluation.preference.request import StudyCreateRequest


@dataclass(frozen=True)
class SourceVideo:
    path: Path
    key: str
    label: str


def list_system_videos(folder: Path) -> list[Path]:
    """One video per file stem (the first suffix in VIDEO_SUFFIXES' order: the MP4 before its GIF twin)."""
    by_stem: dict[str, Path] = {}
    rank = {suffix: index for index, suffix in enumerate(VIDEO_SUFFIXES)}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or suffix not in rank or not path.is_file():
            continue
        current = by_stem.get(path.stem)
        if current is None or rank[suffix] < rank[current.suffix.lower()]:
            by_stem[path.stem] = path
    return [by_stem[stem] for stem in sorted(by_stem)]


def generation_key(record: dict) -> tuple[str, str]:
    """(matching key, label shown to raters) of a generation record: same prompt, image bytes and seed."""
    image = record.get("image_sha256") or record.get("image")
    key = json.dumps([record.get("prompt"), image, record.get("seed")])
    label = record.get("prompt") or (Path(str(record["image"])).name if record.get("image") else "")
    return key, label


def match_videos(systems: dict[str, Path]) -> tuple[str, dict[str, dict[str, SourceVideo]]]:
    """(pairing, {system: {key: video}}): by generation record when every video has one, else by file stem."""
    listed = {name: list_system_videos(folder) for name, folder in systems.items()}
    records: dict[Path, dict | None] = {}
    for name, videos in listed.items():
        for video in videos:
            try:
                records[video] = read_generation_record(video)
            except ValueError as error:
                raise RequestError(f"system {name}: {error}") from None
    pairing = "metadata" if records and all(record is not None for record in records.values()) else "stem"
    matched: dict[str, dict[str, SourceVideo]] = {}
    for name, videos in listed.items():
        matched[name] = {}
        for video in videos:
            key, label = generation_key(records[video]) if pairing == "metadata" else (video.stem, video.stem)
            if key in matched[name]:
                raise RequestError(f"system {name}: {matched[name][key].path.name} and {video.name} were generated "
                                   f"from the same prompt, image and seed; keep one")
            matched[name][key] = SourceVideo(video, key, label)
    return pairing, matched


def plan_pairs(systems: list[str], items: list[SourceVideo], seed: int, video_path: Callable[[str, int], str]
               ) -> list[StudyPair]:
    """Every two systems on every item, sides drawn from `seed`, system pairs rotated from item to item."""
    rng = random.Random(f"sides:{seed}")
    combos = list(itertools.combinations(systems, 2))
    pairs = []
    for index, item in enumerate(items):
        shift = index % len(combos)
        for first, second in combos[shift:] + combos[:shift]:
            left, right = (first, second) if rng.random() < 0.5 else (second, first)
            pairs.append(StudyPair(id=f"p{len(pairs) + 1:05d}", item=item.key, label=item.label, left=left,
                                   right=right, left_video=video_path(left, index),
                                   right_video=video_path(right, index)))
    return pairs


def create_study(request: StudyCreateRequest, progress: Callable[[str], None] | None = None) -> StudyManifest:
    """Match, transcode and pair the videos of `request.systems` into `request.output_dir` (see the module
    docstring); study.json is written last. A video that cannot be decoded is a RequestError naming it."""
    request.check_inputs()
    layout = request.layout
    systems = request.system_dirs()
    names = list(systems)
    pairing, matched = match_videos(systems)
    common = set.intersection(*(set(videos) for videos in matched.values()))
    if not common:
        by = "generation records" if pairing == "metadata" else "file name"
        counts = ", ".join(f"{name}: {len(videos)} videos" for name, videos in matched.items())
        raise RequestError(f"no video is in every system (matched by {by}): {counts}")
    keys = sorted(common, key=lambda key: (matched[names[0]][key].label, key))
    unmatched = {name: sorted(video.path.name for key, video in videos.items() if key not in common)
                 for name, videos in matched.items()}
    gold_rng = random.Random(f"gold:{request.seed}")
    gold_picks = gold_rng.sample([(name, index) for index in range(len(keys)) for name in names],
                                 min(request.gold, len(keys) * len(names)))
    gold_index_of = {pick: gold_index for gold_index, pick in enumerate(gold_picks)}
    for index, key in enumerate(keys):
        for name in names:
            source = matched[name][key].path
            try:
                frames, fps = load_video(source)
            except ValueError as error:
                raise RequestError(f"system {name}: {error}") from None
            write_study_video(frames, fps, layout.video(name, index), request.crf)
            if (name, index) in gold_index_of:
                write_study_video(degrade(frames), fps, layout.gold_video(gold_index_of[name, index]), request.crf)
        if progress:
            progress(f"transcoded item {index + 1}/{len(keys)}")

    def relative(system: str, index: int) -> str:
        return str(layout.video(system, index).relative_to(layout.root))

    items = [matched[names[0]][key] for key in keys]
    pairs = plan_pairs(names, items, request.seed, relative)
    for gold_index, (name, index) in enumerate(gold_picks):
        degraded = str(layout.gold_video(gold_index).relative_to(layout.root))
        original_left = gold_rng.random() < 0.5
        sides = (name, relative(name, index), GOLD_DIR, degraded)
        left, left_video, right, right_video = sides if original_left else (sides[2], sides[3], sides[0], sides[1])
        pairs.append(StudyPair(id=f"g{gold_index + 1:05d}", item=items[index].key, label=items[index].label,
                               left=left, right=right, left_video=left_video, right_video=right_video,
                               gold="left" if original_left else "right"))
    sources = {name: str(folder.resolve()) for name, folder in systems.items()}
    manifest = StudyManifest(systems=names, axes=request.axis_names(), pairing=pairing, items=len(keys),
                             seed=request.seed, sources=sources, gold=len(gold_picks),
                             unmatched={name: files for name, files in unmatched.items() if files})
    write_study(layout, manifest, pairs)
    return manifest
