"""Orbit renders of 3D assets with Blender (`bpy`, Cycles on the CPU, headless): the cameras and the renderer.

Why Blender: it is the renderer Objaverse-based multi-view work uses (SVD-MV, Zero123, SV3D render with it), it
reads GLB/glTF (PBR materials, textures, vertex colours), OBJ (+MTL textures), PLY and STL with its own
importers, and `bpy` is a pip package that runs without a display. Cycles on the CPU renders a 64x64 view in
about 0.15 s. `bpy` is neither fork- nor thread-safe and a broken asset can crash it, so every render runs in
a child process (`python -m common.orbits JOB.json`); the caller sees a crash as an error for the assets
that did not finish, never as its own death.

Camera convention (docs/multiview.md): the asset's own frame, +Y up and +Z its front (glTF's convention; OBJ,
PLY and STL files are read in the same frame). The asset is centred on its bounding box's centre and scaled so
that the box's longest side is 1. The camera sits at distance `radius` from the centre, at `elevation`
degrees above the horizontal plane, and looks at the centre with +Y up in the image; azimuth 0 is the front
(+Z), 90 degrees is +X (counter-clockwise seen from above). View i of N is at azimuth `start + 360 i / N`.
Lighting is a uniform white environment (every direction emits 1.0, so a diffuse surface shows its albedo
modulo occlusion); the film is transparent and composited on white, as the Objaverse renderers do.

API: `OrbitCameras` (elevation, azimuths, radius, fov; `positions()`), `orbit_cameras(...)`,
`RenderSettings`, `render_orbits(jobs, settings)` -> one `RenderResult` per job (frames uint8 (N, H, W, 3)
or an error message).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Importer per file suffix, inside Blender (the child process).
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")
RESULT_FILE = "result.json"
# Orbit defaults shared by `lvd orbits`, `lvd generate --views` and `lvd evaluate-views` (docs/multiview.md); [open].
DEFAULT_ELEVATION = 10.0  # degrees above the horizon
DEFAULT_RADIUS = 2.0  # camera distance; the asset's bounding box has longest side 1
DEFAULT_FOV = 40.0  # degrees
VIEW_PATTERN = "view_{:03d}.png"


@dataclass(frozen=True)
class OrbitCameras:
    """One orbit: the elevation (degrees, above the horizon), each view's azimuth (degrees, 0 = front, 90 = +X),
    the distance from the asset's centre and the vertical = horizontal field of view (square images)."""

    elevation_deg: float
    azimuths_deg: tuple[float, ...]
    radius: float
    fov_deg: float

    def positions(self) -> np.ndarray:
        """(N, 3) camera centres in the asset's frame (+Y up, +Z front)."""
        elevation = math.radians(self.elevation_deg)
        azimuths = np.radians(np.asarray(self.azimuths_deg, dtype=np.float64))
        return self.radius * np.stack([math.cos(elevation) * np.sin(azimuths),
                                       np.full_like(azimuths, math.sin(elevation)),
                                       math.cos(elevation) * np.cos(azimuths)], axis=1)

    def to_dict(self) -> dict:
        return {**asdict(self), "azimuths_deg": list(self.azimuths_deg)}


def orbit_cameras(views: int, elevation_deg: float, radius: float, fov_deg: float,
                  start_azimuth_deg: float = 0.0) -> OrbitCameras:
    """`views` cameras evenly spaced in azimuth on one full turn, starting at `start_azimuth_deg`."""
    if views < 1:
        raise ValueError(f"an orbit needs at least one view, got {views}")
    azimuths = tuple(float((start_azimuth_deg + 360.0 * index / views) % 360.0) for index in range(views))
    return OrbitCameras(float(elevation_deg), azimuths, float(radius), float(fov_deg))


@dataclass(frozen=True)
class RenderSettings:
    """How each view is rendered: square `size` pixels, Cycles `samples` per pixel, CPU `threads` (0: all)."""

    size: int = 576
    samples: int = 32
    threads: int = 0
    timeout_s: float = 600.0  # per child process (a batch of assets)


@dataclass(frozen=True)
class RenderJob:
    """One asset to render: its mesh file, its cameras and a scratch folder for the child's PNGs."""

    mesh: str
    cameras: OrbitCameras
    scratch: str


@dataclass
class RenderResult:
    """What a job produced: frames uint8 (N, H, W, 3) on white, or None and a one-line `error`."""

    frames: np.ndarray | None
    error: str | None = None


def render_orbits(jobs: list[RenderJob], settings: RenderSettings) -> list[RenderResult]:
    """Render every job's orbit in one Blender child process; if the child dies (a crash in Blender on a broken
    asset, the timeout), the jobs it left unfinished are rendered again one per child, so only the culprit
    gets an error. Results are in job order."""
    if not jobs:
        return []
    _run_child(jobs, settings)
    results = [_read_result(job) for job in jobs]
    unfinished = [index for index, result in enumerate(results) if result is None]
    if len(unfinished) > 1 or (unfinished and len(jobs) > 1):
        for index in unfinished:
            _run_child([jobs[index]], settings)
            results[index] = _read_result(jobs[index])
    return [result if result is not None else RenderResult(None, _crash_message(job)) for job, result
            in zip(jobs, results, strict=True)]


def _run_child(jobs: list[RenderJob], settings: RenderSettings) -> None:
    for job in jobs:
        Path(job.scratch).mkdir(parents=True, exist_ok=True)
        (Path(job.scratch) / RESULT_FILE).unlink(missing_ok=True)
    payload = {"settings": asdict(settings),
               "jobs": [{"mesh": job.mesh, "cameras": job.cameras.to_dict(), "scratch": job.scratch} for job in jobs]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="lvd-orbit-job-") as handle:
        json.dump(payload, handle)
    log = Path(jobs[0].scratch) / "blender.log"
    try:
        with open(log, "wb") as output:
            subprocess.run([sys.executable, "-m", "common.orbits", handle.name], stdout=output,
                           stderr=subprocess.STDOUT, timeout=settings.timeout_s * max(1, len(jobs)),
                           env={**os.environ, "PYTHONPATH": _python_path()}, check=False)
    except subprocess.TimeoutExpired:
        pass  # unfinished jobs have no result file: retried alone, then reported
    finally:
        os.unlink(handle.name)


def _python_path() -> str:
    """The child imports this module by name: the project root first on its path."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _read_result(job: RenderJob) -> RenderResult | None:
    from PIL import Image

    path = Path(job.scratch) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result["error"]:
        return RenderResult(None, result["error"])
    frames = [np.asarray(Image.open(Path(job.scratch) / VIEW_PATTERN.format(index)).convert("RGB"))
              for index in range(len(job.cameras.azimuths_deg))]
    return RenderResult(np.stack(frames))


def _crash_message(job: RenderJob) -> str:
    log = Path(job.scratch) / "blender.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    return "the renderer died on this asset (a crash in Blender or the timeout)" + (f": {tail[0][:200]}" if tail
                                                                                      else "")


# ------------------------------------------------------------------------------- inside Blender (the child)


def _child_main(job_file: str) -> None:
    import bpy  # noqa: F401 - Blender as a Python module; only the child imports it

    payload = json.loads(Path(job_file).read_text())
    settings = RenderSettings(**payload["settings"])
    for job in payload["jobs"]:
        scratch = Path(job["scratch"])
        try:
            cameras = OrbitCameras(job["cameras"]["elevation_deg"], tuple(job["cameras"]["azimuths_deg"]),
                                   job["cameras"]["radius"], job["cameras"]["fov_deg"])
            _render_job(Path(job["mesh"]), cameras, settings, scratch)
            error = None
        except Exception as exception:  # noqa: BLE001 - any failure of one asset is its error row
            error = " ".join(f"{type(exception).__name__}: {exception}".split())[:300]
        temporary = scratch / f".{RESULT_FILE}.tmp"
        temporary.write_text(json.dumps({"error": error}))
        os.replace(temporary, scratch / RESULT_FILE)


def _render_job(mesh: Path, cameras: OrbitCameras, settings: RenderSettings, scratch: Path) -> None:
    import bpy
    from mathutils import Vector
    from PIL import Image

    if mesh.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"unsupported mesh format {mesh.suffix!r} (supported: {', '.join(MESH_SUFFIXES)})")
    if not mesh.is_file():
        raise FileNotFoundError(f"no such mesh file: {mesh}")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    _import_mesh(mesh)
    meshes = [obj for obj in bpy.context.scene.objects if obj.type == "MESH" and len(obj.data.vertices)]
    if not meshes:
        raise ValueError("the file holds no mesh geometry")
    _normalise(meshes)
    scene = bpy.context.scene
    _setup_render(scene, settings)
    camera = bpy.data.objects.new("orbit-camera", bpy.data.cameras.new("orbit-camera"))
    scene.collection.objects.link(camera)
    scene.camera = camera
    camera.data.sensor_fit = "AUTO"
    camera.data.angle = math.radians(cameras.fov_deg)
    camera.data.clip_start, camera.data.clip_end = 0.01, 100.0
    for index, (x, y, z) in enumerate(cameras.positions()):
        position = Vector((float(x), float(-z), float(y)))  # asset frame (Y up, Z front) -> Blender (Z up, -Y front)
        camera.location = position
        camera.rotation_euler = (-position).to_track_quat("-Z", "Y").to_euler()
        target = scratch / f".view_{index:03d}.rgba.png"
        scene.render.filepath = str(target)
        bpy.ops.render.render(write_still=True)
        rgba = Image.open(target).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        Image.alpha_composite(white, rgba).convert("RGB").save(scratch / VIEW_PATTERN.format(index))
        target.unlink()


def _import_mesh(mesh: Path) -> None:
    import bpy

    suffix = mesh.suffix.lower()
    if suffix in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=str(mesh))
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(mesh), forward_axis="NEGATIVE_Z", up_axis="Y")
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(mesh), forward_axis="NEGATIVE_Z", up_axis="Y")
    elif suffix == ".stl":
        bpy.ops.wm.stl_import(filepath=str(mesh), forward_axis="NEGATIVE_Z", up_axis="Y")


def _normalise(meshes: list) -> None:
    """Centre the asset's world bounding box on the origin and scale its longest side to 1 (a parent empty
    carries the transform, so animated or nested hierarchies keep their relative placement)."""
    import bpy
    from mathutils import Vector

    bpy.context.view_layer.update()
    corners = np.array([list(obj.matrix_world @ Vector(corner)) for obj in meshes for corner in obj.bound_box])
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = float((high - low).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError("the mesh has no extent (all vertices at one point)")
    root = bpy.data.objects.new("asset-root", None)
    bpy.context.scene.collection.objects.link(root)
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            obj.matrix_world = world
    scale = 1.0 / extent
    root.scale = (scale, scale, scale)
    root.location = tuple(float(v) for v in -(low + high) / 2.0 * scale)
    bpy.context.view_layer.update()


def _setup_render(scene, settings: RenderSettings) -> None:
    import bpy

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = settings.samples
    scene.cycles.use_denoising = False  # deterministic, and no OIDN dependency
    scene.cycles.seed = 0
    scene.render.resolution_x = scene.render.resolution_y = settings.size
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"  # albedo shows as authored (no filmic tone curve)
    if settings.threads:
        scene.render.threads_mode = "FIXED"
        scene.render.threads = settings.threads
    world = bpy.data.worlds.new("uniform-white")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs[0].default_value = (1.0, 1.0, 1.0, 1.0)
    world.node_tree.nodes["Background"].inputs[1].default_value = 1.0
    scene.world = world


if __name__ == "__main__":
    _child_main(sys.argv[1])
