"""Text area of a clip (docs/recipe.md §1 OCR filter): share of the frame covered by detected text boxes.

Detection runs on the first, middle and last frame. Per frame, the area is that of the union of the
detected boxes (rasterised, so overlapping boxes count once; for the usual disjoint boxes this is the
summed box area) divided by the frame area. The clip's `text_area` is the MAX over its frames: a title
card or a burnt-in caption on any one of them is enough to make the clip unsuitable, and the mean would
dilute a title that shows up only at the start.

Two detectors sit behind one interface (`TextDetector.boxes`):
- CRAFT, the paper's detector: EasyOCR's network and post-processing (`get_textbox`) with a
  `craft_mlt_25k.pth` state dict that we load ourselves with torch's weights-only unpickler (EasyOCR's own
  loader unpickles anything, so a planted file would run code in the scorer worker);
- the PP-OCRv4 DB detector that rapidocr-onnxruntime ships (real weights inside the wheel, offline),
  run with onnxruntime; DB post-processing is rapidocr's own `DBPostProcess`.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from curation.scorers.base import chunks, pick_device, require_file, score_isolated
from curation.scorers.config import TextAreaConfig
from curation.types import ClipFrames

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class TextDetector(Protocol):
    """Detects text boxes; `boxes` gets same-sized RGB frames (N, H, W, 3) and returns, per frame,
    a list of polygons (K, 2) in that frame's pixel coordinates."""

    name: str

    def boxes(self, frames: np.ndarray) -> list[list[np.ndarray]]: ...


def bundled_ppocr_det_model() -> Path:
    """The PP-OCRv4 detection model inside the rapidocr-onnxruntime wheel."""
    import rapidocr_onnxruntime

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    found = sorted(models.glob("*det*.onnx"))
    if not found:
        raise FileNotFoundError(f"no '*det*.onnx' in {models}; set scorers.text.ppocr_det_model to a PP-OCR det model")
    return found[-1]


def frames_per_forward(config: TextAreaConfig, device: str) -> int:
    """The configured detector micro-batch, or the measured best default for the device."""
    if config.frames_per_forward:
        return config.frames_per_forward
    return 16 if device.startswith("cuda") else 1


def detection_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side scaled to `long_side`, both rounded to a multiple of 32 (>= 32)."""
    scale = long_side / max(height, width)
    return (max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))


class PPOCRDetector:
    """PP-OCR (DB) text detection with onnxruntime; frames of one size are run together."""

    name = "ppocr"

    def __init__(self, config: TextAreaConfig, device: str = "cpu", threads: int = 1) -> None:
        import onnxruntime as ort
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        if config.ppocr_det_model:
            model_path = require_file(config.ppocr_det_model, "scorers.text.ppocr_det_model", "PP-OCR detector")
        else:
            model_path = bundled_ppocr_det_model()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.long_side = config.det_long_side
        self.frames_per_forward = frames_per_forward(config, device)
        self.postprocess = DBPostProcess(
            thresh=config.ppocr_pixel_threshold,
            box_thresh=config.ppocr_box_threshold,
            unclip_ratio=config.ppocr_unclip_ratio,
            use_dilation=True,
            score_mode="fast",
        )
        self.model_path = model_path

    def boxes(self, frames: np.ndarray) -> list[list[np.ndarray]]:
        height, width = frames.shape[1:3]
        det_h, det_w = detection_size(height, width, self.long_side)
        out: list[list[np.ndarray]] = []
        for part in chunks(frames, self.frames_per_forward):
            resized = np.stack([cv2.resize(f, (det_w, det_h), interpolation=cv2.INTER_LINEAR) for f in part])
            x = (resized.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)  # (x/255 - 0.5) / 0.5
            probability = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
            for prob in probability:
                polygons, _scores = self.postprocess(prob[None], (height, width))
                out.append([np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in polygons])
        return out


def load_craft(path: Path, device: str = "cpu") -> torch.nn.Module:
    """EasyOCR's CRAFT network with the weights at `path`, read as tensors only: a file that would need to run
    code to unpickle is refused with a one-line ValueError, before any of it runs."""
    import torch
    from easyocr.craft import CRAFT

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"CRAFT weights {path} hold more than tensors (a pickle that would run code to load "
                         "it); refusing to load them") from None
    prefix = "module." if next(iter(state), "").startswith("module.") else ""  # saved from DataParallel
    net = CRAFT()
    net.load_state_dict({name.removeprefix(prefix): value for name, value in state.items()})
    if device == "cpu":
        # EasyOCR quantises the CPU model to int8 (its own default for CPU inference; skipped, as there, where
        # this torch build has no quantised engine).
        with contextlib.suppress(RuntimeError, AssertionError):
            torch.quantization.quantize_dynamic(net, dtype=torch.qint8, inplace=True)
    else:
        net = net.to(device)
    return net.eval()


class CraftDetector:
    """CRAFT (the paper's detector): EasyOCR's network and box extraction; weights from a path."""

    name = "craft"

    def __init__(self, config: TextAreaConfig, device: str = "cpu", threads: int = 1) -> None:
        path = config.resolved_craft_weights()
        path = require_file(path, "scorers.text.craft_weights", "CRAFT text detector (craft_mlt_25k.pth)")
        self.device = device
        self.net = load_craft(path, device)
        self.config = config
        self.model_path = path

    def boxes(self, frames: np.ndarray) -> list[list[np.ndarray]]:
        from easyocr.detection import get_textbox

        height, width = frames.shape[1:3]
        cfg = self.config
        out: list[list[np.ndarray]] = []
        for part in chunks(frames, frames_per_forward(cfg, self.device)):
            polygons_per_frame = get_textbox(
                self.net,
                np.asarray(part),
                canvas_size=cfg.det_long_side,
                mag_ratio=cfg.det_long_side / max(height, width),
                text_threshold=cfg.craft_text_threshold,
                link_threshold=cfg.craft_link_threshold,
                low_text=cfg.craft_low_text,
                poly=False,
                device=self.device,
            )
            for polygons in polygons_per_frame:
                out.append([np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in polygons])
        return out


def build_text_detector(config: TextAreaConfig, device: str = "cpu", threads: int = 1) -> TextDetector:
    backend = config.resolved_backend()
    if backend == "craft":
        return CraftDetector(config, device, threads)
    return PPOCRDetector(config, device, threads)


def covered_fraction(polygons: list[np.ndarray], height: int, width: int) -> float:
    """Area of the union of `polygons` over the frame area."""
    if not polygons:
        return 0.0
    mask = np.zeros((height, width), dtype=np.uint8)
    for polygon in polygons:  # one call per box: fillPoly with several polygons fills even-odd (XOR)
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return float(mask.mean())


class TextAreaScorer:
    """`text_area` per clip = max over its frames of the text-covered fraction (see module docstring)."""

    name = "text"
    columns = ("text_area",)

    def __init__(self, config: TextAreaConfig | None = None, device: str = "auto", threads: int = 1) -> None:
        self.config = config or TextAreaConfig()
        self.device = pick_device(device)
        started = time.perf_counter()
        self.detector = build_text_detector(self.config, self.device, threads)
        self.load_seconds = time.perf_counter() - started
        logger.info("text area: %s detector from %s on %s", self.detector.name,
                    getattr(self.detector, "model_path", "?"), self.device)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.detector.name, "weights": str(getattr(self.detector, "model_path", "")),
                "device": self.device}

    def frame_areas(self, batch: list[ClipFrames]) -> list[list[float]]:
        """Text-covered fraction of every frame of every clip; frames of equal size share a forward."""
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for ci, clip in enumerate(batch):
            for fi in range(len(clip.frames)):
                by_shape[clip.frames.shape[1:3]].append((ci, fi))
        areas = [[0.0] * len(clip.frames) for clip in batch]
        for (height, width), members in by_shape.items():
            stacked = np.stack([batch[ci].frames[fi] for ci, fi in members])
            for (ci, fi), polygons in zip(members, self.detector.boxes(stacked), strict=True):
                areas[ci][fi] = covered_fraction(polygons, height, width)
        return areas

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return [{"text_area": max(areas)} for areas in self.frame_areas(batch)]

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, "text_area", self._score_valid)
