"""Multi-view evaluation (`lvd evaluate-views`, flow `evaluate-views`): novel views of held-out 3D assets against
their ground-truth renders, by PSNR, SSIM, LPIPS and CLIP-S, as the SVD paper (SVD-MV on Google Scanned Objects)
and SV3D report them.

Per asset: Blender renders the ground-truth orbit (common/orbits.py, the `lvd orbits` cameras); the checkpoint
generates the orbit from view 0 (the render at azimuth 0, on white) with the same elevation and number of views;
each generated view is compared with the ground-truth view at the same azimuth. Reported per view (mean over
assets), per asset, and as means over all views and over the novel views (1..N-1; view 0 is the input's own
viewpoint).

* PSNR: 10 log10(1 / MSE) on [0, 1] RGB; identical images give infinity (reported as the string "inf" in JSON).
* SSIM: Wang et al.'s, on RGB in [0, 1] averaged over channels: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03 (scikit-image's `structural_similarity` with `gaussian_weights=True`).
* LPIPS: the `lpips` package's LPIPS (AlexNet, v0.1) with its whole state dict (backbone and linear heads) from
  a local file (`lpips_weights`); nothing is downloaded. Without the file LPIPS is null, never guessed.
* CLIP-S: cosine similarity of the CLIP image embeddings of the generated and the ground-truth view (open_clip,
  local weights as in `lvd evaluate-fvd`); null without weights.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.orbits import (
    DEFAULT_ELEVATION,
    DEFAULT_FOV,
    DEFAULT_RADIUS,
    MESH_SUFFIXES,
    RenderJob,
    RenderSettings,
    orbit_cameras,
    render_orbits,
)
from common.requests import Request, RequestError, setting
from dataformat import atomic_write, atomic_write_json

METRICS = ("psnr", "ssim", "lpips", "clip_s")


def psnr(generated: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of uint8 RGB images on [0, 1]; inf when they are identical."""
    mse = float(np.mean((generated.astype(np.float64) / 255.0 - truth.astype(np.float64) / 255.0) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(generated: np.ndarray, truth: np.ndarray) -> float:
    """SSIM of uint8 RGB images (Gaussian window 11, sigma 1.5, the paper's constants), mean over channels."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(generated.astype(np.float64) / 255.0, truth.astype(np.float64) / 255.0,
                                       channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


class LpipsDistance:
    """LPIPS (AlexNet, v0.1) with every weight from one local state-dict file."""

    def __init__(self, weights: str, device: str = "cpu") -> None:
        import lpips
        import torch

        if not Path(weights).is_file():
            raise RequestError(f"lpips_weights: no such file: {weights}")
        self.model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)  # nothing fetched
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        except Exception as error:  # noqa: BLE001 - a wrong file is the user's one-line error
            raise RequestError(f"lpips_weights {weights}: not an LPIPS (alex) state dict ({error})") from None
        self.model = self.model.eval().to(device)
        self.device = device

    def __call__(self, generated: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """Per-image distances of uint8 (N, H, W, 3) batches."""
        import torch

        def tensor(images: np.ndarray) -> torch.Tensor:
            pixels = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: inputs may be read-only
            return pixels.permute(0, 3, 1, 2).div(127.5).sub(1.0).to(self.device)

        with torch.inference_mode():
            return self.model(tensor(generated), tensor(truth)).flatten().double().cpu().numpy()


class ClipImageSimilarity:
    """CLIP-S: cosine similarity of open_clip image embeddings of two images (local weights only)."""

    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "cpu") -> None:
        from common.openclip import load_open_clip

        self.model, self.preprocess_cfg = load_open_clip(model_name, pretrained, "clip", device)
        self.device = device

    def embed(self, images: np.ndarray):
        import torch

        from common.openclip import frames_to_model_input, resize_for_model

        with torch.inference_mode():
            pixels = frames_to_model_input(resize_for_model(images, self.preprocess_cfg), self.preprocess_cfg,
                                           self.device)
            return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def __call__(self, generated: np.ndarray, truth: np.ndarray) -> np.ndarray:
        return (self.embed(generated) * self.embed(truth)).sum(-1).double().cpu().numpy()


@dataclass(frozen=True)
class EvaluateViewsRequest(Request):
    """Render held-out meshes' ground-truth orbits, generate each from view 0, write the metrics to `out`."""

    checkpoint: str = setting(path="dir", help="a multi-view finetune's pipeline (OUTPUT_ROOT/stage3-multiview/"
                                               "pipeline)")
    meshes: str = setting(path="dir", help=f"folder of held-out 3D assets ({', '.join(MESH_SUFFIXES)})")
    out: str = setting("views.json", path="output", help="results JSON (a PNG strip per asset is written next to it)")
    views: int = setting(21, min=2, max=1000, help="views per orbit (frames generated)")
    size: int = setting(576, min=8, max=4096, help="square render and generation size, a multiple of 8")
    elevation: float = setting(DEFAULT_ELEVATION, min=-89.0, max=89.0, help="camera elevation in degrees")
    radius: float = setting(DEFAULT_RADIUS, min=0.6, max=100.0, help="camera distance (as `lvd orbits`)")
    fov: float = setting(DEFAULT_FOV, min=1.0, max=170.0, help="field of view in degrees (as `lvd orbits`)")
    samples: int = setting(32, min=1, max=4096, help="Cycles samples per pixel of the ground truth")
    steps: int = setting(25, min=1, help="sampling steps")
    guidance: str = setting("1.0,3.0", help="'w' or 'min,max' rising over the views")
    noise_aug: float = setting(0.02, min=0.0, help="noise augmentation of the input view")
    seed: int = setting(0, help="seed of the sampling noise")
    lpips_weights: str | None = setting(None, path="file", help="LPIPS (alex, v0.1) state dict file; without it "
                                                                "LPIPS is not measured")
    clip_model: str | None = setting(None, help="open_clip model name or 'local-dir:/folder'; without it CLIP-S "
                                                "is not measured")
    clip_pretrained: str | None = setting(None, help="open_clip weights file for clip_model")
    threads: int = setting(0, min=0, help="CPU threads per render (0: all)")

    def validate(self) -> None:
        if self.size % 8:
            raise RequestError(f"size must be a multiple of 8 (the VAE's factor), got {self.size}")
        if not str(self.out).endswith(".json"):
            raise RequestError(f"out must be a .json file, got {self.out}")

    def check_inputs(self) -> list[Path]:
        assets = sorted(p for p in Path(self.meshes).rglob("*") if p.suffix.lower() in MESH_SUFFIXES)
        if not assets:
            raise RequestError(f"meshes {self.meshes}: no 3D assets ({', '.join(MESH_SUFFIXES)}) under it")
        return assets


def strip(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (H, N * W, 3): the views side by side."""
    return np.concatenate(list(frames), axis=1)


def evaluate_views(request: EvaluateViewsRequest, progress: bool = False) -> dict[str, Any]:
    """Render, generate, measure; writes `request.out` (and one generated-over-truth PNG strip per asset)."""
    import torch
    from PIL import Image

    from model.loading import load_pipeline
    from model.multiview import multiview_arguments

    assets = request.check_inputs()
    lpips_model = LpipsDistance(request.lpips_weights) if request.lpips_weights else None
    clip_model = ClipImageSimilarity(request.clip_model, request.clip_pretrained) if request.clip_model else None
    cameras = orbit_cameras(request.views, request.elevation, request.radius, request.fov)
    with tempfile.TemporaryDirectory(prefix="lvd-evaluate-views-") as scratch:
        jobs = [RenderJob(str(path), cameras, str(Path(scratch) / str(index))) for index, path in enumerate(assets)]
        truths = render_orbits(jobs, RenderSettings(size=request.size, samples=request.samples,
                                                    threads=request.threads))
    pipe = load_pipeline(request.checkpoint, device="auto")
    if not hasattr(pipe, "image_encoder"):
        raise RequestError(f"checkpoint {request.checkpoint}: not an image-to-video (multi-view) pipeline")
    low, _, high = request.guidance.partition(",")
    scales = (float(low), float(high or low))
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_asset, per_view = [], {name: [[] for _ in range(request.views)] for name in METRICS}
    for path, truth in zip(assets, truths, strict=True):
        name = str(path.relative_to(request.meshes))
        if truth.error:
            per_asset.append({"asset": name, "error": truth.error})
            continue
        orbit = multiview_arguments(pipe, request.views, request.elevation)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        generated = pipe(torch.from_numpy(truth.frames[:1]).permute(0, 3, 1, 2).float() / 255.0,
                         height=request.size, width=request.size, num_inference_steps=request.steps,
                         min_guidance_scale=scales[0], max_guidance_scale=scales[1],
                         noise_aug_strength=request.noise_aug, decode_chunk_size=request.views, generator=generator,
                         progress=progress, **orbit).frames[0]
        scores = view_scores(generated, truth.frames, lpips_model, clip_model)
        for metric, values in scores.items():
            for index, value in enumerate(values):
                per_view[metric][index].append(value)
        strip_path = out.with_name(f"{out.stem}-{len(per_asset):03d}.png")
        image = Image.fromarray(np.concatenate([strip(generated), strip(truth.frames)], axis=0))
        atomic_write(strip_path, lambda handle, image=image: image.save(handle, format="PNG"))
        per_asset.append({"asset": name, "strip": str(strip_path),
                          **{metric: _mean(values) for metric, values in scores.items()}})
    measured = [asset for asset in per_asset if "error" not in asset]
    view_means = {metric: [_mean(values) for values in per_view[metric]] for metric in METRICS}
    results = {
        "checkpoint": request.checkpoint, "assets": len(per_asset), "measured": len(measured),
        "mean": {metric: _mean([v for views in per_view[metric] for v in views]) for metric in METRICS},
        "mean_novel_views": {metric: _mean([v for views in per_view[metric][1:] for v in views])
                             for metric in METRICS},
        "per_view": view_means, "per_asset": per_asset,
        "not_measured": [name for name, model in (("lpips", lpips_model), ("clip_s", clip_model)) if model is None],
        "settings": request.to_dict(),
    }
    atomic_write_json(out, json_ready(results))
    return results


def view_scores(generated: np.ndarray, truth: np.ndarray, lpips_model: LpipsDistance | None,
                clip_model: ClipImageSimilarity | None) -> dict[str, list[float | None]]:
    """Each metric per view of one orbit (uint8 (N, H, W, 3) each); None where its model is not given."""
    if generated.shape != truth.shape:
        raise ValueError(f"generated views {generated.shape} and ground truth {truth.shape} differ in shape")
    views = len(truth)
    return {
        "psnr": [psnr(g, t) for g, t in zip(generated, truth, strict=True)],
        "ssim": [ssim(g, t) for g, t in zip(generated, truth, strict=True)],
        "lpips": [float(v) for v in lpips_model(generated, truth)] if lpips_model else [None] * views,
        "clip_s": [float(v) for v in clip_model(generated, truth)] if clip_model else [None] * views,
    }


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def json_ready(value: Any) -> Any:
    """inf -> "inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    return value
