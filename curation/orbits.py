"""Orbit data from 3D assets (`lvd orbits`, flow `render-orbits`): each asset rendered on one camera orbit, in the
curated format (manifest.parquet + WebDataset shards), so `lvd train --conditioning multiview --data OUT` reads it.

A run is a curation run whose sources are mesh files (`dataformat.RunLayout`): every asset is staged (Blender
renders its views in a child process, `common.orbits`; the views become one H.264 clip; its row, with the
cameras, goes to work/clip_rows/) and then committed by its source row in sources.parquet/, so a killed run
resumes with the assets it had not committed, and an asset Blender cannot render is an error row, never a
failed run. `finalize_orbits` writes shards (each `KEY.json` the orbit manifest row, cameras included) and the
manifest once every asset is committed. The flow stages batches of assets on Ray workers and commits on the
driver, as curation does.

Elevation per asset: `elevation`, or drawn uniformly from `random_elevation` (LO,HI) with an RNG seeded by
(seed, the asset's id), so a resumed or re-sharded run draws the same cameras.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.orbits import (
    DEFAULT_ELEVATION,
    DEFAULT_FOV,
    DEFAULT_RADIUS,
    MESH_SUFFIXES,
    OrbitCameras,
    RenderJob,
    RenderSettings,
    orbit_cameras,
    render_orbits,
)
from common.requests import Request, RequestError, setting
from curation.dataset import changed_settings, check_output_dir, commit_source, local_copy
from curation.listing import iter_sources, pending_sources
from dataformat import (
    ORBIT_MANIFEST_SCHEMA,
    ORBIT_PART_SCHEMA,
    Column,
    RunLayout,
    atomic_write_json,
    clip_id,
    read_parquet_rows,
    remove_stale_temporaries,
    source_id,
    source_label,
    write_parquet_atomic,
    write_shards,
)
from infra.output_lock import acquire_output_lock

# Settings that shape what a committed asset holds: a rerun into the same OUT must keep them.
RENDER_SETTINGS = ("views", "size", "elevation", "random_elevation", "radius", "fov", "samples", "seed", "fps")


def parse_elevation_range(text: str) -> tuple[float, float]:
    """'LO,HI' (degrees) -> (LO, HI), LO <= HI, both within (-90, 90)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise RequestError(f"random_elevation must be 'LO,HI' in degrees, e.g. '-5,30', got {text!r}") from None
    if not -90 < low <= high < 90:
        raise RequestError(f"random_elevation must satisfy -90 < LO <= HI < 90, got {text!r}")
    return low, high


@dataclass(frozen=True)
class OrbitRequest(Request):
    """Render every mesh under MESH_DIR on an orbit into OUT (manifest + WebDataset shards with the cameras)."""

    mesh_dir: str = setting(positional=True, path="dir", help=f"folder of 3D assets ({', '.join(MESH_SUFFIXES)}), "
                                                               "searched recursively")
    output_path: str = setting(positional=True, path="output",
                               help="output folder (a curated-format run: manifest.parquet, shards/, "
                                    "sources.parquet/ with one row per asset)")
    views: int = setting(21, min=1, max=1000, help="views per orbit, evenly spaced in azimuth (SVD-MV: 21)")
    size: int = setting(576, min=8, max=4096, help="square image size in pixels, a multiple of 8 (SVD-MV: 576)")
    elevation: float = setting(DEFAULT_ELEVATION, min=-89.0, max=89.0,
                               help="camera elevation in degrees above the horizon [open]")
    random_elevation: str | None = setting(None, flag="--random-elevation",
                                           help="'LO,HI': draw each asset's elevation uniformly in [LO, HI] degrees "
                                                "instead (write --random-elevation=-5,30 for a negative LO)")
    radius: float = setting(DEFAULT_RADIUS, min=0.6, max=100.0,
                            help="camera distance from the centre; the asset's bounding box has longest side 1 [open]")
    fov: float = setting(DEFAULT_FOV, min=1.0, max=170.0, help="field of view in degrees [open]")
    samples: int = setting(32, min=1, max=4096, help="Cycles samples per pixel")
    fps: float = setting(7.0, min=1.0, max=120.0, help="frame rate written into each orbit clip [open]")
    seed: int = setting(0, help="seed of the random elevations")
    assets_per_task: int = setting(4, min=1, help="assets one Blender child process (one Prefect task run) renders")
    threads: int = setting(1, min=0, help="CPU threads per render (0: all); Ray gives each task one CPU")
    shard_samples: int = setting(1000, min=1, help="orbits per shard at most")
    ray_address: str | None = setting(None, help='Ray cluster, e.g. "ray://head:10001"; default: a local Ray')

    def validate(self) -> None:
        if self.size % 8:
            raise RequestError(f"size must be a multiple of 8 (the VAE's factor), got {self.size}")
        if self.random_elevation is not None:
            parse_elevation_range(self.random_elevation)

    def check_inputs(self) -> int:
        """The number of assets under `mesh_dir` (none is an error naming the folder); OUT must be writable."""
        count = sum(1 for _ in iter_sources(self.mesh_dir, MESH_SUFFIXES))
        if not count:
            raise RequestError(f"mesh_dir {self.mesh_dir}: no 3D assets ({', '.join(MESH_SUFFIXES)}) under it")
        check_output_dir(self.output_path)
        return count

    @property
    def render_settings(self) -> RenderSettings:
        return RenderSettings(size=self.size, samples=self.samples, threads=self.threads)

    def recorded_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RENDER_SETTINGS}

    def cameras_for(self, relative_path: str) -> OrbitCameras:
        """The asset's orbit: fixed elevation, or one drawn from (seed, asset id)."""
        elevation = self.elevation
        if self.random_elevation is not None:
            low, high = parse_elevation_range(self.random_elevation)
            entropy = [self.seed, int(source_id(relative_path)[:16], 16)]
            elevation = float(np.random.default_rng(entropy).uniform(low, high))
        return orbit_cameras(self.views, elevation, self.radius, self.fov)


def prepare_orbit_output(request: OrbitRequest) -> RunLayout:
    """Take OUT (one writer), refuse to mix render settings with committed assets, record the settings."""
    layout = RunLayout(check_output_dir(request.output_path))
    acquire_output_lock(layout.out)
    if layout.config.is_file() and any(layout.sources.glob("part-*.parquet")):
        changes = changed_settings(json.loads(layout.config.read_text()), request.recorded_settings())
        if changes:
            raise RequestError(f"{layout.out} holds orbits rendered with other settings ({'; '.join(changes)}); "
                               "rerun with those settings or render into a new output folder")
    remove_stale_temporaries(layout.out)
    atomic_write_json(layout.config, request.recorded_settings())
    return layout


def pending_assets(request: OrbitRequest) -> Iterator[str]:
    """Relative paths of the assets OUT has not committed, in sorted order."""
    return pending_sources(RunLayout(request.output_path), iter_sources(request.mesh_dir, MESH_SUFFIXES))


def stage_assets(request: OrbitRequest, relative_paths: list[str]) -> list[dict[str, Any]]:
    """Render a batch of assets in one Blender child and write each one's clip and clip row (not its source row:
    `commit_source` does that). Returns one staged source row per asset, in order."""
    layout = RunLayout(request.output_path)
    jobs, staged = [], []
    with contextlib.ExitStack() as stack:  # remote assets are downloaded to work/downloads/ while they render
        paths = [stack.enter_context(local_copy(request.mesh_dir, rel, layout.downloads)) for rel in relative_paths]
        for relative_path, path in zip(relative_paths, paths, strict=True):
            sid = source_id(relative_path)
            shutil.rmtree(layout.renders(sid), ignore_errors=True)
            shutil.rmtree(layout.clips / sid, ignore_errors=True)
            jobs.append(RenderJob(str(path), request.cameras_for(relative_path), str(layout.renders(sid))))
        results = render_orbits(jobs, request.render_settings)
    for relative_path, job, result in zip(relative_paths, jobs, results, strict=True):
        staged.append(_stage_asset(layout, request, relative_path, job.cameras, result.frames, result.error))
        shutil.rmtree(job.scratch, ignore_errors=True)
    return staged


def _stage_asset(layout: RunLayout, request: OrbitRequest, relative_path: str, cameras: OrbitCameras,
                 frames: np.ndarray | None, error: str | None) -> dict[str, Any]:
    from common.video import save_video
    from infra.local import current_ray_node_id

    sid = source_id(relative_path)
    label = source_label(relative_path)
    source_row: dict[str, Any] = {Column.SOURCE: label, Column.STATUS: "error" if error else "ok",
                                  Column.ERROR: error, Column.NODE_ID: current_ray_node_id(),
                                  "source_id": sid, "num_clips": 0}
    rows = []
    if error is None:
        clip = clip_id(sid, 0)
        clip_path = save_video(frames, layout.clips / sid / f"{clip}.mp4", request.fps)
        views, height, width = frames.shape[:3]
        rows.append({
            Column.CLIP_ID: clip, Column.SOURCE: label, Column.START_FRAME: 0, Column.END_FRAME: views,
            "start_s": 0.0, "end_s": views / request.fps, Column.FPS: request.fps, Column.WIDTH: width,
            Column.HEIGHT: height, Column.KEEP: True, Column.DROP_REASONS: [], Column.CLIP_METHOD: "render",
            Column.ELEVATION: cameras.elevation_deg, Column.AZIMUTHS: list(cameras.azimuths_deg),
            Column.CAMERA_RADIUS: cameras.radius, Column.FOV: cameras.fov_deg, Column.CLIP_PATH: str(clip_path),
        })
        source_row.update({"num_frames": views, "fps": request.fps, "width": width, "height": height,
                           "duration_s": views / request.fps, "num_clips": 1})
    write_parquet_atomic(rows, ORBIT_PART_SCHEMA, layout.clip_rows_part(sid))
    return source_row


def commit_asset(request: OrbitRequest, relative_path: str, staged: dict[str, Any]) -> dict[str, Any]:
    """Commit a staged asset (its source row, written last)."""
    return commit_source(request.output_path, relative_path, staged)


def finalize_orbits(request: OrbitRequest) -> dict[str, Any]:
    """Shards and manifest of every committed asset's orbit, and summary.json."""
    layout = RunLayout(request.output_path)
    committed = {part.stem.removeprefix("part-") for part in layout.sources.glob("part-*.parquet")}
    rows = []
    for part in sorted(layout.clip_rows.glob("part-*.parquet")):
        if part.stem.removeprefix("part-") in committed:
            rows.extend(read_parquet_rows(part))
    rows.sort(key=lambda row: row[Column.CLIP_ID])
    write_shards(rows, layout.shards, request.shard_samples, 1 << 40, prefix="orbits", schema=ORBIT_MANIFEST_SCHEMA)
    write_parquet_atomic(rows, ORBIT_MANIFEST_SCHEMA, layout.manifest)
    sources = read_parquet_rows(layout.sources)
    summary = {
        "assets": len(sources), "assets_ok": sum(s["status"] == "ok" for s in sources),
        "assets_error": sum(s["status"] == "error" for s in sources),
        "errors": {s["source"]: s["error"] for s in sources if s["status"] == "error"},
        "orbits": len(rows), "views": request.views, "size": request.size,
        "shards": sorted(p.name for p in layout.shards.glob("*.tar")), "output": str(layout.out),
    }
    atomic_write_json(layout.summary, summary)
    return summary


def render_orbits_sequential(request: OrbitRequest) -> dict[str, Any]:
    """The whole run in this process, without Prefect or Ray (tests, debugging): stage and commit each batch."""
    from curation.listing import source_batches

    prepare_orbit_output(request)
    for batch in source_batches(pending_assets(request), request.assets_per_task):
        for relative_path, staged in zip(batch, stage_assets(request, batch), strict=True):
            commit_asset(request, relative_path, staged)
    return finalize_orbits(request)
