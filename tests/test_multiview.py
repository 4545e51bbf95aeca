"""Multi-view: Blender orbit renders follow the geometry, orbit runs carry their cameras through the shards into
training, a 2-step SVD-MV finetune exports and generates 21 views, and the metrics are right on known pairs.

The meshes are written by the tests (trimesh): a cube whose six faces have six colours, the same cube textured
(an image texture: +X red, every other face blue) and a vertex-coloured sphere; renders are a few views at 32-64
pixels with 4 Cycles samples. Models are tiny random SVDs (tests/svd_helpers.py) saved to disk first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common.orbits import RenderJob, RenderSettings, orbit_cameras, render_orbits
from common.requests import RequestError
from curation.orbits import OrbitRequest, render_orbits_sequential
from dataformat import Column, find_shards, index_shards, read_shard_samples
from tests.svd_helpers import bikes_frame

# Face colour by outward normal in the asset's frame (+Y up, +Z front).
FACE_COLOURS = {(1, 0, 0): (255, 0, 0), (-1, 0, 0): (0, 255, 0), (0, 1, 0): (0, 0, 255),
                (0, -1, 0): (255, 255, 0), (0, 0, 1): (255, 0, 255), (0, 0, -1): (0, 255, 255)}
SMALL = dict(views=6, size=64, samples=4, threads=1)


def coloured_cube(path: Path) -> Path:
    import trimesh

    cube = trimesh.creation.box()
    cube.unmerge_vertices()  # one colour per face, not averaged at shared corners
    cube.visual.face_colors = [(*FACE_COLOURS[tuple(int(round(v)) for v in n)], 255) for n in cube.face_normals]
    cube.export(path)
    return path


def textured_cube(path: Path) -> Path:
    """A cube with an image texture: the +X face samples the texture's red half, every other face its blue half."""
    import trimesh

    cube = trimesh.creation.box()
    cube.unmerge_vertices()
    texture = np.zeros((8, 16, 3), np.uint8)
    texture[:, :8] = (255, 0, 0)
    texture[:, 8:] = (0, 0, 255)
    uv = np.full((len(cube.vertices), 2), (0.75, 0.5))
    for face, normal in zip(cube.faces, cube.face_normals, strict=True):
        if normal[0] > 0.5:
            uv[face] = (0.25, 0.5)
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(texture))
    cube.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    cube.export(path)
    return path


def coloured_sphere(path: Path) -> Path:
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=2)
    sphere.visual.vertex_colors = (200, 60, 40, 255)
    sphere.export(path)
    return path


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory) -> Path:
    """cube.glb, nested/sphere.ply and broken.obj (an OBJ whose vertices are all one point)."""
    root = tmp_path_factory.mktemp("meshes")
    coloured_cube(root / "cube.glb")
    (root / "nested").mkdir()
    coloured_sphere(root / "nested" / "sphere.ply")
    (root / "broken.obj").write_text("v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n")
    return root


@pytest.fixture(scope="module")
def orbit_run(mesh_dir, tmp_path_factory) -> tuple[OrbitRequest, dict]:
    out = tmp_path_factory.mktemp("orbits") / "out"
    request = OrbitRequest.build({"mesh_dir": str(mesh_dir), "output_path": str(out), "random_elevation": "0,30",
                                  "seed": 3, **SMALL})
    return request, render_orbits_sequential(request)


def dominant(pixel: np.ndarray) -> tuple[int, int, int]:
    """A rendered pixel as the pure colour it shows (channels above half -> 255), specular sheen aside."""
    return tuple(255 if value > 127 else 0 for value in pixel)


def test_renders_show_the_face_the_camera_looks_at(tmp_path):
    cube, textured = coloured_cube(tmp_path / "cube.glb"), textured_cube(tmp_path / "textured.glb")
    orbit, above = orbit_cameras(4, 0.0, 2.0, 40.0), orbit_cameras(1, 80.0, 2.0, 40.0)
    jobs = [RenderJob(str(cube), orbit, str(tmp_path / "a")), RenderJob(str(textured), orbit, str(tmp_path / "b")),
            RenderJob(str(cube), above, str(tmp_path / "c")), RenderJob(str(tmp_path / "none.glb"), above,
                                                                        str(tmp_path / "d"))]
    cube_views, textured_views, top, missing = render_orbits(jobs, RenderSettings(size=32, samples=4, threads=1))
    # azimuth 0 looks at the front (+Z), 90 at +X, 180 at -Z, 270 at -X
    assert [dominant(view[16, 16]) for view in cube_views.frames] == [
        FACE_COLOURS[(0, 0, 1)], FACE_COLOURS[(1, 0, 0)], FACE_COLOURS[(0, 0, -1)], FACE_COLOURS[(-1, 0, 0)]]
    assert [dominant(view[16, 16]) for view in textured_views.frames] == [(0, 0, 255), (255, 0, 0), (0, 0, 255),
                                                                          (0, 0, 255)]
    assert dominant(top.frames[0][16, 16]) == FACE_COLOURS[(0, 1, 0)]  # from high above: the top face
    assert (cube_views.frames[:, 0, 0] == 255).all()  # transparent film composited on white
    assert missing.frames is None and "no such mesh file" in missing.error


def test_orbit_run_keeps_cameras_in_the_shards_and_errors_as_rows(orbit_run, mesh_dir):
    request, summary = orbit_run
    assert (summary["assets"], summary["assets_error"], summary["orbits"]) == (3, 1, 2)
    assert "no extent" in summary["errors"]["broken.obj"]
    samples = {s["json"]["source"]: s for shard in find_shards(request.output_path)
               for s in read_shard_samples(shard)}
    assert sorted(samples) == ["cube.glb", "nested/sphere.ply"]
    for source, sample in samples.items():
        cameras = request.cameras_for(source)  # drawn from (seed, asset): the same on every rerun
        meta = sample["json"]
        assert 0 <= meta[Column.ELEVATION] <= 30 and meta[Column.ELEVATION] == cameras.elevation_deg
        assert meta[Column.AZIMUTHS] == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]
        assert (meta[Column.CAMERA_RADIUS], meta[Column.FOV]) == (2.0, 40.0)
        assert (meta[Column.WIDTH], meta[Column.HEIGHT], meta[Column.END_FRAME]) == (64, 64, 6)
    manifest = pq.read_table(Path(request.output_path) / "manifest.parquet").to_pylist()
    assert {row[Column.SOURCE]: row[Column.AZIMUTHS] for row in manifest} == {
        source: sample["json"][Column.AZIMUTHS] for source, sample in samples.items()}


def test_orbit_run_resumes_and_refuses_other_settings(orbit_run):
    request, _ = orbit_run
    parts = sorted((Path(request.output_path) / "sources.parquet").glob("part-*.parquet"))
    before = {part: part.stat().st_mtime_ns for part in parts}
    assert render_orbits_sequential(request)["assets"] == 3  # nothing left to render: every asset committed
    assert {part: part.stat().st_mtime_ns for part in parts} == before
    with pytest.raises(RequestError, match="other settings.*views: 6 -> 8"):
        render_orbits_sequential(request.with_overrides(views=8))


def test_multiview_reader_gives_view_0_first_and_the_camera(orbit_run):
    from dataclasses import replace

    from model.multiview import MULTIVIEW_FPS, MULTIVIEW_MOTION_BUCKET
    from training.data import TrainingStream
    from training.stages import get_stage_preset

    request, _ = orbit_run
    preset = get_stage_preset(3, "tiny", "multiview")
    assert preset.elevation_condition == "paper"  # the recipe's default
    shards = index_shards(find_shards(request.output_path))
    batch = next(iter(TrainingStream(shards, preset, seed=0, micro_batch_size=2)))
    frames = preset.phases[0].num_frames
    assert batch["pixels"].shape == (2, frames, 3, 64, 64) and batch["camera"].shape == (2, frames, 2)
    elevations = batch["camera"][:, 0, 0]
    assert torch.equal(batch["elevation"].float(), elevations)  # the paper's SVD-MV: its own (fourth) id
    assert (batch["motion_bucket"] == MULTIVIEW_MOTION_BUCKET).all() and (batch["fps"] == MULTIVIEW_FPS).all()
    assert batch["camera"][0, :, 1].tolist() == [60.0 * i * 6 // frames for i in range(frames)]
    on_bucket = replace(preset, elevation_condition="motion-bucket")
    batch = next(iter(TrainingStream(shards, on_bucket, seed=0, micro_batch_size=2)))
    assert torch.equal(batch["motion_bucket"].float(), elevations)  # the option: it rides the motion bucket


def test_paper_finetune_learns_the_elevation_and_generates_with_it(svd_dir, orbit_run, tmp_path):
    """SVD-MV the paper's way on rendered orbits: the widened U-Net starts as SVD for every elevation; after a few
    optimizer steps the elevation columns moved and the export's orbits differ between two elevations."""
    from dataclasses import replace

    from generation.generate import GenerateRequest, generate_videos
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_elevation_condition
    from training.data import TrainingStream
    from training.stages import get_stage_preset
    from training.trainer import StageTrainer

    torch.set_num_threads(1)
    request, _ = orbit_run
    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    preset = replace(get_stage_preset(3, "tiny", "multiview"), ema_decay=None)
    with pytest.raises(ValueError, match="'paper' needs a U-Net with 4 added-time ids, this one embeds 3"):
        StageTrainer(pipe, preset, seed=0)
    pipe.unet = with_elevation_condition(pipe.unet)
    trainer = StageTrainer(pipe, preset, seed=0)
    stream = iter(TrainingStream(index_shards(find_shards(request.output_path)), preset, seed=0,
                                 micro_batch_size=preset.phases[0].batch_size))  # one micro-batch per step
    for _ in range(3):
        trainer.train_step([next(stream)])
    assert trainer.unet.add_embedding.linear_1.weight[:, -32:].abs().sum() > 0  # the new columns trained

    pipe.unet.eval()
    pipe.save_pretrained(tmp_path / "mv")
    image = tmp_path / "view0.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(image)
    orbits = [generate_videos(GenerateRequest(checkpoint=str(tmp_path / "mv"), image=str(image), views=6,
                                              elevation=elevation, height=64, width=64, steps=2), progress=False).videos
              for elevation in (0.0, 30.0)]
    assert orbits[0].shape == (1, 6, 64, 64, 3) and not np.array_equal(orbits[0], orbits[1])


def test_camera_embedding_starts_as_svd_and_trains(svd_dir, orbit_run, tmp_path):
    """The SV3D option: zero-initialised, so the U-Net's output is unchanged; one real training step moves it;
    the export keeps this project's class names (new layers) and generates an orbit with cameras."""
    from dataclasses import replace

    from generation.generate import GenerateRequest, generate_videos
    from model.image_to_video import ImageToVideoPipeline
    from model.multiview import with_camera_embedding
    from training.data import TrainingStream
    from training.stages import get_stage_preset
    from training.trainer import StageTrainer

    torch.set_num_threads(1)
    pipe = ImageToVideoPipeline.from_pretrained(svd_dir)
    extended = with_camera_embedding(pipe.unet)
    sample, ids, context = torch.randn(1, 6, 8, 8, 8), torch.tensor([[6.0, 10.0, 0.02]]), torch.randn(1, 1, 32)
    camera = torch.tensor([[[10.0, 60.0 * i] for i in range(6)]])
    with torch.no_grad():
        torch.testing.assert_close(extended(sample, torch.tensor([0.5]), context, ids, camera=camera).sample,
                                   pipe.unet(sample, torch.tensor([0.5]), context, ids).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has a camera embedding: pass camera"):
        extended(sample, torch.tensor([0.5]), context, ids)

    request, _ = orbit_run
    pipe.unet = extended
    preset = replace(get_stage_preset(3, "tiny", "multiview"), camera_embedding=True, ema_decay=None,
                     elevation_condition="motion-bucket")
    trainer = StageTrainer(pipe, preset, seed=0)
    stream = TrainingStream(index_shards(find_shards(request.output_path)), preset, seed=0)
    trainer.train_step([next(iter(stream))])
    assert trainer.unet.camera_mlp.linear_2.weight.abs().sum() > 0

    pipe.save_pretrained(tmp_path / "camera")
    index = json.loads((tmp_path / "camera" / "model_index.json").read_text())
    assert index["_class_name"] == "ImageToVideoPipeline"  # not diffusers' SVD: it would drop the camera layers
    image = tmp_path / "view0.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(image)
    generated = generate_videos(GenerateRequest(checkpoint=str(tmp_path / "camera"), image=str(image), views=21,
                                                elevation=20.0, height=64, width=64, steps=2), progress=False)
    assert generated.videos.shape == (1, 21, 64, 64, 3) and generated.warnings == []
    assert generated.settings["motion_bucket_id"] == 20.0


@pytest.mark.slow  # Ray Train end to end: left out of make test-fast
def test_two_step_multiview_finetune_exports_and_generates_21_views(svd_dir, orbit_run, tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    from generation.generate import GenerateRequest, generate_videos
    from training.loop import run_stage
    from training.request import StageRunRequest

    request, _ = orbit_run
    result = run_stage(StageRunRequest.build(dict(stage=3, conditioning="multiview", init=str(svd_dir),
                                                  data=request.output_path, output_root=str(tmp_path), max_steps=2)))
    pipeline = Path(result["pipeline"])
    assert pipeline == tmp_path.resolve() / "stage3-multiview" / "pipeline" and result["step"] == 2
    stock = StableVideoDiffusionPipeline.from_pretrained(pipeline)  # diffusers' classes load the paper's SVD-MV
    assert stock.unet.add_embedding.linear_1.in_features == 4 * stock.unet.config.addition_time_embed_dim
    image = tmp_path / "photo.png"
    bikes_frame().resize((64, 64)).save(image)
    generated = generate_videos(GenerateRequest(checkpoint=str(pipeline), image=str(image), views=21, elevation=15.0,
                                                height=64, width=64, steps=2), progress=False)
    assert generated.videos.shape == (1, 21, 64, 64, 3)
    assert len(generated.warnings) == 1 and "white background" in generated.warnings[0]


def test_metrics_on_known_pairs(tmp_path):
    import lpips
    from open_clip.model import CLIP

    from common.openclip import save_local_dir
    from evaluation.views import ClipImageSimilarity, LpipsDistance, psnr, ssim, view_scores
    from tests.scorer_helpers import TINY_CLIP

    torch.manual_seed(0)
    torch.save(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).state_dict(), tmp_path / "lpips.pth")
    save_local_dir(CLIP(**TINY_CLIP), TINY_CLIP, tmp_path / "clip")
    distance = LpipsDistance(str(tmp_path / "lpips.pth"))
    similarity = ClipImageSimilarity(f"local-dir:{tmp_path / 'clip'}")
    photo = np.asarray(bikes_frame().resize((64, 64)))[None]
    shifted = np.roll(photo, 4, axis=2)

    same = view_scores(photo, photo, distance, similarity)
    assert same["psnr"] == [math.inf] and same["ssim"][0] == pytest.approx(1.0)
    assert same["lpips"][0] == pytest.approx(0.0, abs=1e-6) and same["clip_s"][0] == pytest.approx(1.0, abs=1e-5)
    moved = view_scores(shifted, photo, distance, similarity)
    assert math.isfinite(moved["psnr"][0]) and moved["ssim"][0] < 0.9 and moved["lpips"][0] > 1e-3
    assert moved["clip_s"][0] < 1.0 - 1e-5
    # 0 against 0.2 everywhere: MSE 0.04, PSNR 10 log10(25)
    assert psnr(np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 51, np.uint8)) == pytest.approx(10 * math.log10(25))
    assert psnr(photo[0], np.roll(photo, 1, axis=2)[0]) > psnr(photo[0], shifted[0])
    assert ssim(photo[0], np.roll(photo, 1, axis=2)[0]) > ssim(photo[0], shifted[0])
    with pytest.raises(RequestError, match="not an LPIPS"):
        torch.save({"weight": torch.zeros(1)}, tmp_path / "wrong.pth")
        LpipsDistance(str(tmp_path / "wrong.pth"))


def test_evaluate_views_writes_metrics_and_strips(svd_dir, tmp_path):
    from evaluation.views import EvaluateViewsRequest, evaluate_views

    meshes = tmp_path / "held-out"
    meshes.mkdir()
    coloured_cube(meshes / "cube.glb")
    out = tmp_path / "results" / "views.json"
    evaluate_views(EvaluateViewsRequest.build(dict(checkpoint=str(svd_dir), meshes=str(meshes), out=str(out),
                                                   views=3, size=32, samples=4, steps=2, threads=1)))
    results = json.loads(out.read_text())
    assert results["measured"] == 1 and results["not_measured"] == ["lpips", "clip_s"]
    assert len(results["per_view"]["psnr"]) == 3 and results["mean"]["lpips"] is None
    assert 0 < results["mean"]["psnr"] < 60 and -1 <= results["mean"]["ssim"] <= 1
    strip = np.asarray(Image.open(results["per_asset"][0]["strip"]))
    assert strip.shape == (64, 96, 3)  # generated views over the ground truth
    assert dominant(strip[48, 16]) == FACE_COLOURS[(0, 0, 1)]  # truth view 0 is the cube's front


def test_white_background_check():
    from generation.multiview import white_background_warning

    assert white_background_warning(Image.new("RGB", (64, 64), "white"), "white.png") is None
    warning = white_background_warning(bikes_frame(), "bikes.png")
    assert warning.startswith("image bikes.png: only") and "white background" in warning and "\n" not in warning


def test_bad_inputs_name_the_setting(tmp_path, mesh_dir, capsys):
    from flows.cli import main
    from generation.generate import GenerateRequest
    from training.request import StageRunRequest

    with pytest.raises(RequestError, match="size must be a multiple of 8"):
        OrbitRequest.build({"mesh_dir": str(mesh_dir), "output_path": str(tmp_path), "size": 60})
    with pytest.raises(RequestError, match="random_elevation must be 'LO,HI'"):
        OrbitRequest.build({"mesh_dir": str(mesh_dir), "output_path": str(tmp_path), "random_elevation": "low,high"})
    with pytest.raises(RequestError, match="views/elevation are multi-view settings"):
        GenerateRequest.build({"views": 21})
    with pytest.raises(RequestError, match="multi-view finetune is stage 3"):
        StageRunRequest.build({"stage": 2, "conditioning": "multiview", "data": str(tmp_path)})
    with pytest.raises(RequestError, match="camera_embedding is a multi-view option"):
        StageRunRequest.build({"stage": 3, "conditioning": "image", "camera_embedding": True,
                               "data": str(tmp_path)})
    with pytest.raises(RequestError, match="elevation_condition is a multi-view option"):
        StageRunRequest.build({"stage": 3, "conditioning": "image", "elevation_condition": "motion-bucket",
                               "data": str(tmp_path)})
    with pytest.raises(RequestError, match="elevation_condition"):
        StageRunRequest.build({"stage": 3, "conditioning": "multiview", "elevation_condition": "azimuth",
                               "data": str(tmp_path)})
    (tmp_path / "empty").mkdir()
    assert main(["orbits", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no 3D assets" in capsys.readouterr().err


def test_flows_render_orbits_on_ray_and_publish_the_metrics(prefect_api, svd_dir, tmp_path):
    """render-orbits (batches on a local Ray, driver commits) and evaluate-views (strips inline) as Prefect flows."""
    import httpx

    from flows.multiview import evaluate_views_flow
    from flows.orbits import render_orbits_flow

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    coloured_cube(meshes / "a.glb")
    coloured_sphere(meshes / "b.ply")
    summary = render_orbits_flow(mesh_dir=str(meshes), output_path=str(tmp_path / "orbits"), views=2, size=32,
                                 samples=4, assets_per_task=1, threads=1)
    assert (summary["assets"], summary["assets_error"], summary["orbits"]) == (2, 0, 2)
    assert len(index_shards(find_shards(tmp_path / "orbits"))) == 2
    results = evaluate_views_flow(checkpoint=str(svd_dir), meshes=str(meshes), out=str(tmp_path / "views.json"),
                                  views=2, size=32, samples=4, steps=1, threads=1)
    assert results["measured"] == 2
    response = httpx.post(f"{prefect_api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["evaluate-views"]}}, "sort": "CREATED_DESC", "limit": 1})
    artifact = response.json()[0]["data"]
    assert "| mean, all views |" in artifact and artifact.count("data:image/png;base64,") == 2
