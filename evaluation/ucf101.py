"""The paper's zero-shot UCF-101 text-to-video protocol (docs/recipe.md §5), minus the orchestration.

13,320 videos in the class distribution of UCF-101, the class name as prompt, 16 frames at 25 fps,
CFG w = 7, generated at 320 x 576, resized (antialiased) to 240 x 432 and centre-cropped to 240 x 320,
then scored with FVD against the real UCF-101 videos (evaluation.fvd).

Class names and per-class video counts are UCF-101's own: the union of the official split lists
(ucfTrainTestlist/trainlist01 + testlist01; splits 2 and 3 give the same 13,320 files) grouped by class
folder, in classInd order. `counts_from_root` re-derives them from a local copy of the dataset, so a
run can check them. Smaller runs (`num_videos` < 13,320) keep the distribution by largest-remainder
rounding. Prompts: the CamelCase class name split into lowercase words ("ApplyEyeMakeup" ->
"apply eye makeup"); the paper says "class name" and gives no template, the split is our reading.
Each video has its own seed (seed + index), so results do not depend on the batch size and an
interrupted run can resume.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.video import resize_cover_crop
from evaluation.fvd import PROTOCOL_RESIZE, list_videos

UCF101_CLASSES: tuple[tuple[str, int], ...] = (
    ("ApplyEyeMakeup", 145), ("ApplyLipstick", 114), ("Archery", 145), ("BabyCrawling", 132), ("BalanceBeam", 108),
    ("BandMarching", 155), ("BaseballPitch", 150), ("Basketball", 134), ("BasketballDunk", 131), ("BenchPress", 160),
    ("Biking", 134), ("Billiards", 150), ("BlowDryHair", 131), ("BlowingCandles", 109), ("BodyWeightSquats", 112),
    ("Bowling", 155), ("BoxingPunchingBag", 163), ("BoxingSpeedBag", 134), ("BreastStroke", 101),
    ("BrushingTeeth", 131), ("CleanAndJerk", 112), ("CliffDiving", 138), ("CricketBowling", 139),
    ("CricketShot", 167), ("CuttingInKitchen", 110), ("Diving", 150), ("Drumming", 161), ("Fencing", 111),
    ("FieldHockeyPenalty", 126), ("FloorGymnastics", 125), ("FrisbeeCatch", 126), ("FrontCrawl", 137),
    ("GolfSwing", 139), ("Haircut", 130), ("Hammering", 140), ("HammerThrow", 150), ("HandstandPushups", 128),
    ("HandstandWalking", 111), ("HeadMassage", 147), ("HighJump", 123), ("HorseRace", 124), ("HorseRiding", 164),
    ("HulaHoop", 125), ("IceDancing", 158), ("JavelinThrow", 117), ("JugglingBalls", 121), ("JumpingJack", 123),
    ("JumpRope", 144), ("Kayaking", 141), ("Knitting", 123), ("LongJump", 131), ("Lunges", 127),
    ("MilitaryParade", 125), ("Mixing", 136), ("MoppingFloor", 110), ("Nunchucks", 132), ("ParallelBars", 114),
    ("PizzaTossing", 113), ("PlayingCello", 164), ("PlayingDaf", 151), ("PlayingDhol", 164), ("PlayingFlute", 155),
    ("PlayingGuitar", 160), ("PlayingPiano", 105), ("PlayingSitar", 157), ("PlayingTabla", 111),
    ("PlayingViolin", 100), ("PoleVault", 149), ("PommelHorse", 123), ("PullUps", 100), ("Punch", 160),
    ("PushUps", 102), ("Rafting", 111), ("RockClimbingIndoor", 144), ("RopeClimbing", 119), ("Rowing", 137),
    ("SalsaSpin", 133), ("ShavingBeard", 161), ("Shotput", 144), ("SkateBoarding", 120), ("Skiing", 135),
    ("Skijet", 100), ("SkyDiving", 110), ("SoccerJuggling", 147), ("SoccerPenalty", 137), ("StillRings", 112),
    ("SumoWrestling", 116), ("Surfing", 126), ("Swing", 131), ("TableTennisShot", 140), ("TaiChi", 100),
    ("TennisSwing", 166), ("ThrowDiscus", 130), ("TrampolineJumping", 119), ("Typing", 136), ("UnevenBars", 104),
    ("VolleyballSpiking", 116), ("WalkingWithDog", 123), ("WallPushups", 130), ("WritingOnBoard", 152),
    ("YoYo", 128),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in UCF101_CLASSES)
CLASS_COUNTS: dict[str, int] = dict(UCF101_CLASSES)
TOTAL_VIDEOS = 13_320
assert len(CLASS_NAMES) == 101 and sum(CLASS_COUNTS.values()) == TOTAL_VIDEOS


def class_prompt(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup' (a text encoder reads words, not CamelCase)."""
    return " ".join(re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", name)).lower()


def allocate(num_videos: int, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Videos per class for `num_videos`, proportional to `counts` (UCF-101's by default), summing exactly
    to `num_videos` (largest remainder; ties go to the class listed first)."""
    counts = counts or CLASS_COUNTS
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    total = sum(counts.values())
    quotas = {name: num_videos * count / total for name, count in counts.items()}
    allotted = {name: int(quota) for name, quota in quotas.items()}
    order = sorted(counts, key=lambda name: (-(quotas[name] - allotted[name]), list(counts).index(name)))
    for name in order[: num_videos - sum(allotted.values())]:
        allotted[name] += 1
    return allotted


@dataclass(frozen=True)
class ProtocolVideo:
    index: int
    class_name: str
    prompt: str
    seed: int


def protocol_videos(num_videos: int = TOTAL_VIDEOS, seed: int = 0,
                    counts: dict[str, int] | None = None) -> list[ProtocolVideo]:
    """The full list of videos to generate, grouped by class in classInd order."""
    videos = []
    for name, count in allocate(num_videos, counts).items():
        for _ in range(count):
            index = len(videos)
            videos.append(ProtocolVideo(index, name, class_prompt(name), seed + index))
    return videos


def counts_from_root(root: str | Path) -> dict[str, int]:
    """Videos per UCF-101 class in a local copy (class folders or v_<Class>_gXX_cYY files)."""
    found: Counter[str] = Counter()
    for path in list_videos(root):
        match = re.match(r"v_([A-Za-z]+)_g\d+_c\d+", path.stem)
        name = match.group(1) if match else path.parent.name
        if name in CLASS_COUNTS:
            found[name] += 1
    return {name: found[name] for name in CLASS_NAMES if found[name]}


@dataclass(frozen=True)
class ProtocolSettings:
    """docs/recipe.md §5 defaults; everything that changes the generated set is here (and in the artifact)."""

    num_videos: int = TOTAL_VIDEOS
    num_frames: int = 16
    fps: int = 25
    guidance_scale: float = 7.0
    height: int = 320
    width: int = 576
    out_height: int = 240
    out_width: int = 320
    steps: int = 25
    motion_bucket_id: int = 127
    seed: int = 0

    def validate(self) -> None:
        from evaluation.i3d import MIN_FRAMES

        if self.num_videos < 2:
            raise ValueError(f"num_videos must be >= 2 (FVD needs two or more videos), got {self.num_videos}")
        if self.num_frames < MIN_FRAMES:
            raise ValueError(f"num_frames must be >= {MIN_FRAMES} for I3D, got {self.num_frames}")
        if min(self.height, self.width, self.out_height, self.out_width, self.steps, self.fps) < 1:
            raise ValueError(f"sizes, steps and fps must be positive: {self}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def initial_latents(pipe, videos: Sequence[ProtocolVideo], settings: ProtocolSettings):
    """Standard-normal latents, one generator per video (seed + index): batch-size independent."""
    import torch

    from model.vae import scale_factor

    factor = scale_factor(pipe.vae)
    if settings.height % factor or settings.width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}")
    shape = (settings.num_frames, pipe.unet.config.in_channels, settings.height // factor, settings.width // factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(v.seed)) for v in videos])


def generate_videos(pipe, videos: Sequence[ProtocolVideo], settings: ProtocolSettings) -> np.ndarray:
    """Generate `videos` with the protocol's sampling settings; uint8 (B, T, 240, 320, 3) after resize/crop."""
    output = pipe([v.prompt for v in videos], num_frames=settings.num_frames, height=settings.height,
                  width=settings.width, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  fps=settings.fps, motion_bucket_id=settings.motion_bucket_id,
                  latents=initial_latents(pipe, videos, settings), progress=False)
    return resize_cover_crop(output.frames, settings.out_height, settings.out_width, interpolation=PROTOCOL_RESIZE)


def sample_grid(tiles: Sequence[tuple[str, np.ndarray]], columns: int = 11, tile_width: int = 128) -> np.ndarray:
    """A labelled contact sheet: the middle frame of one video per class, `columns` per row (uint8 RGB)."""
    import cv2

    if not tiles:
        raise ValueError("no videos to put in the grid")
    first = tiles[0][1]
    tile_height = round(tile_width * first.shape[1] / first.shape[2])
    label_height = 14
    rows = -(-len(tiles) // columns)
    columns = min(columns, len(tiles))
    sheet = np.full((rows * (tile_height + label_height), columns * tile_width, 3), 255, dtype=np.uint8)
    for position, (label, clip) in enumerate(tiles):
        frame = cv2.resize(clip[len(clip) // 2], (tile_width, tile_height), interpolation=cv2.INTER_AREA)
        y, x = (position // columns) * (tile_height + label_height), (position % columns) * tile_width
        sheet[y : y + tile_height, x : x + tile_width] = frame
        cv2.putText(sheet, label[:20], (x + 2, y + tile_height + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return sheet
