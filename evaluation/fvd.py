"""Fréchet Video Distance and Kernel Video Distance on Kinetics-400 I3D logits.

The reference (google-research `frechet_video_distance`) resizes every frame to 224 x 224 with TF1's
`resize_bilinear` (align_corners=False, no half-pixel centres), scales to [-1, 1], takes the 400-d
logits of DeepMind's I3D and computes the Fréchet distance between Gaussians fitted to the two sets.
We do the same: `resize_bilinear_tf` reproduces TF1's sampling grid, `evaluation.i3d` the network, and the
distance is computed in float64 with a symmetric-eigendecomposition square root (no complex parts,
no NaN from a rank-deficient covariance). KVD is the unbiased polynomial-kernel MMD^2 (KID's
estimator) on the same features, averaged over random subsets.

Folder-level API: `compute_fvd(FolderFvdRequest(real_dir, fake_dir))`; features of the real set are cached on disk keyed
by the content hash of its files and the preprocessing settings, so re-scoring new samples against
UCF-101 only pays for the generated videos.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.requests import Request, setting
from dataformat import VIDEO_SUFFIXES, atomic_write

logger = logging.getLogger(__name__)

I3D_SIZE = 224
DEFAULT_NUM_FRAMES = 16
# The UCF-101 protocol's 320x576 -> 240x320 resize (antialiased, like the paper's torchvision-era code).
PROTOCOL_RESIZE = "antialiased-bilinear"
FEATURE_VERSION = "i3d-k400-logits/tf1-bilinear-224/v1"  # bump when preprocessing or network changes


class VideoSetError(ValueError):
    """A video folder or file that cannot be scored; the message names the path and the reason."""


# ------------------------------------------------------------------------------------------- reading


def list_videos(directory: str | Path) -> list[Path]:
    """Video files under `directory` (recursive), in a stable order."""
    directory = Path(directory)
    if not directory.exists():
        raise VideoSetError(f"{directory}: folder does not exist")
    if not directory.is_dir():
        raise VideoSetError(f"{directory}: not a folder")
    videos = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise VideoSetError(f"{directory}: no video files (looked for {', '.join(VIDEO_SUFFIXES)})")
    return videos


def frame_indices(num_frames: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Which decoded frames make a `num_frames` clip at `target_fps` (consecutive frames if either rate is
    unknown or they agree within 1%)."""
    if not target_fps or not source_fps or abs(source_fps / target_fps - 1) < 0.01:
        return list(range(num_frames))
    step = source_fps / target_fps
    return [int(round(i * step)) for i in range(num_frames)]


def read_clip(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES, fps: float | None = None) -> np.ndarray:
    """The first `num_frames` frames (resampled to `fps` when given) as uint8 (T, H, W, 3) RGB."""
    import av

    from common.video import NoVideoStreamError, decode_frames_at

    path = Path(path)
    if not path.is_file():
        raise VideoSetError(f"{path}: not a file")
    try:
        frames = decode_frames_at(path, lambda rate: frame_indices(num_frames, rate, fps))
    except NoVideoStreamError:
        raise VideoSetError(f"{path}: no video stream") from None
    except (av.FFmpegError, UnicodeDecodeError, ValueError, OSError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise VideoSetError(f"{path}: not a readable video ({reason})") from None
    if len(frames) < num_frames:
        at = f" at {fps:g} fps" if fps else ""
        raise VideoSetError(f"{path}: too few frames ({len(frames)} decoded, {num_frames} needed{at})")
    return np.stack(frames)


def prefetch(items: Sequence[Any], load: Callable[[Any], Any], ahead: int = 8, workers: int = 2) -> Iterator[Any]:
    """`load(item)` for each item in order, decoding up to `ahead` items in background threads (PyAV and
    numpy release the GIL) while the caller runs the network; memory stays bounded."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.submit(load, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:
                pending.append(pool.submit(load, item))
                break
            yield result


# -------------------------------------------------------------------------------------- preprocessing


def resize_bilinear_tf(images, height: int, width: int):
    """TF1 `tf.image.resize_bilinear(align_corners=False)` on float (N, C, H, W): source = dest * in/out,
    no half-pixel offset, edge clamped. Not torch's `interpolate`, whose grid is shifted by half a pixel."""
    import torch

    def axis(size_in: int, size_out: int, device) -> tuple:
        source = torch.arange(size_out, device=device, dtype=torch.float32) * (size_in / size_out)
        low = source.floor().long().clamp(max=size_in - 1)
        high = (low + 1).clamp(max=size_in - 1)
        return low, high, (source - low.float())

    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (height, width):
        return images
    low, high, frac = axis(in_w, width, images.device)
    left, right = images.index_select(-1, low), images.index_select(-1, high)
    images = left + (right - left) * frac
    low, high, frac = axis(in_h, height, images.device)
    top, bottom = images.index_select(-2, low), images.index_select(-2, high)
    return top + (bottom - top) * frac[:, None]


def i3d_input(clips, size: int = I3D_SIZE):
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, 224, 224) in [-1, 1], as the reference FVD prepares it."""
    import torch

    clips = torch.as_tensor(np.asarray(clips) if not isinstance(clips, torch.Tensor) else clips)
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be (B, T, H, W, 3), got {tuple(clips.shape)}")
    batch, frames, height, width, _ = clips.shape
    x = clips.reshape(batch * frames, height, width, 3).permute(0, 3, 1, 2).float()
    x = resize_bilinear_tf(x, size, size)
    x = x * (2.0 / 255.0) - 1.0
    return x.reshape(batch, frames, 3, size, size).permute(0, 2, 1, 3, 4).contiguous()


# ------------------------------------------------------------------------------------------- features


class I3DFeatureExtractor:
    """Kinetics-400 I3D logits (N, 400) float64 for uint8 clips; loads the network once."""

    def __init__(self, weights: str | Path | None = None, device: str = "auto", batch_size: int = 8,
                 threads: int | None = None) -> None:
        import torch

        from evaluation.i3d import load_i3d

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.model = load_i3d(weights, device=self.device)

    def logits(self, clips) -> np.ndarray:
        """One batch of uint8 clips (B, T, H, W, 3) -> (B, 400) float64."""
        import torch

        with torch.inference_mode():
            x = i3d_input(torch.as_tensor(np.asarray(clips)).to(self.device))
            return self.model(x).double().cpu().numpy()

    def features(self, clips: Iterable[np.ndarray], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Logits of a stream of clips, `batch_size` at a time (clips in a batch must share a size)."""
        parts, batch = [], []
        for clip in clips:
            batch.append(clip)
            if len(batch) == self.batch_size:
                parts.append(self._run(batch, progress))
                batch = []
        if batch:
            parts.append(self._run(batch, progress))
        return np.concatenate(parts) if parts else np.zeros((0, 400))

    def _run(self, batch: list[np.ndarray], progress: Callable[[int], None] | None) -> np.ndarray:
        shapes = {clip.shape for clip in batch}
        if len(shapes) == 1:
            out = self.logits(np.stack(batch))
        else:  # mixed sizes: resize separately (the result is identical, only less batched)
            out = np.concatenate([self.logits(clip[None]) for clip in batch])
        if progress:
            progress(len(batch))
        return out


@dataclass(frozen=True)
class ClipSettings:
    """How a file becomes an I3D input; part of the real-feature cache key."""

    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float | None = None
    size: tuple[int, int] | None = None  # (height, width): cover-resize + centre-crop first (UCF-101 protocol)

    def validate(self) -> None:
        from evaluation.i3d import MIN_FRAMES

        if self.num_frames < MIN_FRAMES:
            raise ValueError(f"num_frames must be >= {MIN_FRAMES} for I3D, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (height, width), got {self.size}")

    def read(self, path: str | Path) -> np.ndarray:
        clip = read_clip(path, self.num_frames, self.fps)
        if self.size is not None:
            from common.video import resize_cover_crop

            clip = resize_cover_crop(clip, *self.size, interpolation=PROTOCOL_RESIZE)
        return clip


def folder_features(directory: str | Path, extractor: I3DFeatureExtractor, settings: ClipSettings | None = None,
                    *, limit: int | None = None, skip_unreadable: bool = False,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """I3D logits of the videos in a folder (optionally the first `limit`) and their relative names."""
    settings = settings or ClipSettings()
    settings.validate()
    directory = Path(directory)
    paths = list_videos(directory)[:limit]
    skipped: list[str] = []

    def load(path: Path) -> np.ndarray | None:
        try:
            return settings.read(path)
        except VideoSetError as error:
            if not skip_unreadable:
                raise
            skipped.append(str(error))
            return None

    names: list[str] = []

    def clips() -> Iterator[np.ndarray]:
        for path, clip in zip(paths, prefetch(paths, load, ahead=2 * extractor.batch_size), strict=True):
            if clip is not None:
                names.append(path.relative_to(directory).as_posix())
                yield clip

    features = extractor.features(clips(), progress)
    if skipped:
        logger.warning("skipped %d unreadable videos in %s, e.g. %s", len(skipped), directory, skipped[0])
    return features, names


def folder_fingerprint(directory: str | Path, settings: ClipSettings, limit: int | None = None) -> str:
    """sha256 over the files' relative names and contents, the clip settings and the feature version."""
    directory = Path(directory)
    digest = hashlib.sha256()
    digest.update(json.dumps({"settings": asdict(settings), "version": FEATURE_VERSION}).encode())
    for path in list_videos(directory)[:limit]:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def cached_folder_features(directory: str | Path, extractor: I3DFeatureExtractor,
                           settings: ClipSettings | None = None, *, limit: int | None = None,
                           cache_dir: str | Path | None = None, progress: Callable[[int], None] | None = None,
                           ) -> tuple[np.ndarray, list[str], bool]:
    """Like `folder_features`, reusing features saved for identical content; returns (features, names, hit)."""
    from common.cache import fvd_feature_cache

    settings = settings or ClipSettings()
    settings.validate()
    cache = Path(cache_dir) if cache_dir else fvd_feature_cache()
    key = folder_fingerprint(directory, settings, limit)
    path = cache / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return stored["features"], [str(n) for n in stored["names"]], True
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring unreadable feature cache %s (%s)", path, error)
    features, names = folder_features(directory, extractor, settings, limit=limit, progress=progress)
    atomic_write(path, lambda handle: np.savez(handle, features=features, names=np.array(names)))
    return features, names, False


# -------------------------------------------------------------------------------------------- distances


def _check_features(features: np.ndarray, what: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{what} features must be (N, D), got shape {features.shape}")
    if features.shape[0] < 2:
        raise VideoSetError(f"{what}: FVD needs at least 2 videos per set, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise ValueError(f"{what} features contain NaN or inf")
    return features


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues from rounding
    are clipped to 0, so rank-deficient covariances (fewer videos than dimensions) stay real."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2), all in float64."""
    real, fake = _check_features(real, "real"), _check_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root_r = _psd_sqrt(cov_r)
    middle = root_r @ cov_f @ root_r
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    distance = float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * trace_sqrt)
    return max(distance, 0.0)


def kernel_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, mean over random subsets (KID)."""
    real, fake = _check_features(real, "real"), _check_features(fake, "fake")
    dim = real.shape[1]
    size = min(len(real), len(fake), subset_size)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)


def distances(real: np.ndarray, fake: np.ndarray, kvd_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    return {"fvd": frechet_distance(real, fake), "kvd": kernel_distance(real, fake, kvd_subsets, seed=seed)}


@dataclass(frozen=True)
class FolderFvdRequest(Request):
    """FVD/KVD between two folders of videos (`lvd fvd`); the folders are checked when they are read, so a
    missing or empty one gets the message of `list_videos`."""

    real_dir: str = setting(positional=True, path="input", help="folder of real videos")
    fake_dir: str = setting(positional=True, path="input", help="folder of generated videos")
    num_frames: int = setting(DEFAULT_NUM_FRAMES, flag="--frames", help="frames per video (the first N)")
    fps: float | None = setting(None, help="resample videos to this frame rate first")
    batch_size: int = setting(8, min=1, help="videos per I3D batch")
    limit: int | None = setting(None, min=2, help="use only the first N videos of each folder")
    device: str = setting("auto", help="torch device of I3D")
    threads: int | None = setting(None, min=1, help="torch CPU threads")
    weights: str | None = setting(None, help="I3D safetensors (default: cache, see lvd i3d-weights)")
    cache_real: bool = setting(True, negate="--no-cache", help="reuse/cache the real set's features "
                                                                "(CLI: --no-cache turns it off)")
    print_json: bool = setting(False, flag="--json", help='print {"fvd", "kvd", "num_real", "num_fake"}')

    def validate(self) -> None:
        ClipSettings(num_frames=self.num_frames, fps=self.fps).validate()


def compute_fvd(request: FolderFvdRequest, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """FVD and KVD between two folders of videos (real features cached by content hash)."""
    real_dir, fake_dir, limit = request.real_dir, request.fake_dir, request.limit
    num_frames, fps = request.num_frames, request.fps
    settings = ClipSettings(num_frames=num_frames, fps=fps)
    settings.validate()
    real_paths, fake_paths = list_videos(real_dir)[:limit], list_videos(fake_dir)[:limit]
    for what, paths in (("real", real_paths), ("fake", fake_paths)):
        if len(paths) < 2:
            raise VideoSetError(f"{what} folder {real_dir if what == 'real' else fake_dir}: FVD needs at least "
                                f"2 videos, found {len(paths)}")
    extractor = I3DFeatureExtractor(request.weights, device=request.device, batch_size=request.batch_size,
                                    threads=request.threads)
    if request.cache_real:
        real, _, hit = cached_folder_features(real_dir, extractor, settings, limit=limit, progress=progress)
    else:
        (real, _), hit = folder_features(real_dir, extractor, settings, limit=limit, progress=progress), False
    fake, _ = folder_features(fake_dir, extractor, settings, limit=limit, progress=progress)
    return {**distances(real, fake), "num_real": int(len(real)), "num_fake": int(len(fake)),
            "num_frames": num_frames, "fps": fps, "real_features_cached": hit}
