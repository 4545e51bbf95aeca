"""Settings of the learned curation scorers (text area, CLIP, the three captioners, RAFT) and of their Ray actor pools.

Defaults follow docs/recipe.md §1 (captions mixed 0.5 / 0.25 / 0.25 at training time; RAFT at 800x450). The LVD-F
drop rules over the columns these scorers fill (text area > 7 % and the 25 % most text, the 25 % lowest
aesthetics, the 50 % lowest CLIP score) are `FilterRule`s in `CurationConfig.filters`, next to the
motion rule, so every rule of the run is in one list; only the stage III `hq` selection is set here.
Real weights are never downloaded at run time: every model setting takes a local path (or a name that
open_clip resolves from its local cache). A scorer whose weights are not configured is switched off
and says which setting to fill (`ScorersConfig.unavailable`); a configured path that does not exist is
an error naming that setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.requests import check_ranges

TEXT_BACKENDS = ("auto", "ppocr", "craft")


@dataclass
class ActorPoolConfig:
    """How one model is spread over Ray actors. One model load per actor; each call scores a batch.

    `num_gpus=None` means: 1 / `actors_per_gpu` when the Ray cluster has GPUs, else 0 (CPU actors).
    `num_actors=None` means: GPUs in the cluster x `actors_per_gpu`, or 1 on a CPU-only cluster.
    """

    num_actors: int | None = None
    num_gpus: float | None = None
    actors_per_gpu: int = 2
    num_cpus: float = 1.0
    torch_threads: int = 1  # intra-op threads per actor; CPU actors should not oversubscribe their cores
    batch_size: int = 16  # clips per actor call (amortises the object-store round trip)
    max_batches_in_flight: int = 2  # per actor; bounds memory while keeping each actor's queue non-empty

    def validate(self, name: str) -> None:
        check_ranges(self, f"{name}.pool", {"num_actors": (1, None), "num_gpus": (0, None), "actors_per_gpu": (1, None),
                                            "num_cpus": (0, None), "torch_threads": (1, None), "batch_size": (1, None),
                                            "max_batches_in_flight": (1, None)})


def easyocr_model_dir() -> Path:
    """Where EasyOCR keeps `craft_mlt_25k.pth` (EASYOCR_MODULE_PATH or MODULE_PATH or ~/.EasyOCR, + /model)."""
    base = os.environ.get("EASYOCR_MODULE_PATH") or os.environ.get("MODULE_PATH") or "~/.EasyOCR"
    return Path(base).expanduser() / "model"


@dataclass
class TextAreaConfig:
    """Text area on the first, middle and last frame (docs/recipe.md §1: the CRAFT detector).

    backend: 'craft' = EasyOCR's CRAFT detector (the paper's), 'ppocr' = the PP-OCRv4 detector bundled
    with rapidocr-onnxruntime, 'auto' = CRAFT when its weights are found, else PP-OCR.
    """

    enabled: bool = True
    backend: str = "auto"
    craft_weights: str | None = None  # path to craft_mlt_25k.pth; None: look in EasyOCR's model dir
    ppocr_det_model: str | None = None  # path to a PP-OCR det .onnx; None: the one rapidocr ships
    det_long_side: int = 640  # frames are resized so the long side is this (multiple of 32) for detection
    # frames per detector forward; None = 1 on CPU (batching 640 px frames is slower there, see
    # benchmarks/scorers.py) and 16 on a GPU
    frames_per_forward: int | None = None
    # PP-OCR DB post-processing (rapidocr's defaults)
    ppocr_pixel_threshold: float = 0.3
    ppocr_box_threshold: float = 0.5
    ppocr_unclip_ratio: float = 1.6
    # CRAFT post-processing (EasyOCR's defaults)
    craft_text_threshold: float = 0.7
    craft_link_threshold: float = 0.4
    craft_low_text: float = 0.4
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=4))

    def resolved_craft_weights(self) -> Path | None:
        """The CRAFT weights to use, or None when there are none (then 'auto' falls back to PP-OCR)."""
        if self.craft_weights:
            return Path(self.craft_weights).expanduser()
        candidate = easyocr_model_dir() / "craft_mlt_25k.pth"
        return candidate if candidate.is_file() else None

    def resolved_backend(self) -> str:
        if self.backend not in TEXT_BACKENDS:
            raise ValueError(f"scorers.text.backend must be one of {TEXT_BACKENDS}, got {self.backend!r}")
        if self.backend != "auto":
            return self.backend
        return "craft" if self.resolved_craft_weights() is not None else "ppocr"

    def validate(self) -> None:
        self.resolved_backend()
        check_ranges(self, "scorers.text", {"frames_per_forward": (1, None), "det_long_side": (32, None),
                                            "ppocr_pixel_threshold": (0, 1), "ppocr_box_threshold": (0, 1),
                                            "ppocr_unclip_ratio": (0, None), "craft_text_threshold": (0, 1),
                                            "craft_link_threshold": (0, 1), "craft_low_text": (0, 1)})
        if self.det_long_side % 32:
            raise ValueError(f"scorers.text.det_long_side must be a multiple of 32, got {self.det_long_side}")
        self.pool.validate("scorers.text")


@dataclass
class ClipScoreConfig:
    """CLIP embeddings of first/middle/last frame -> LAION aesthetic score and caption-frame similarity.

    model_name: an open_clip architecture ('ViT-L-14', matching the LAION predictor's 768-d input) or
    'local-dir:/path' holding open_clip_config.json + weights. pretrained: a weights file (or an
    open_clip tag already in its cache). aesthetic_weights: the LAION aesthetic predictor (.pth; the
    MLP 'sac+logos+ava1-l14-linearMSE.pth' or the linear 'sa_0_4_vit_l_14_linear.pth').
    """

    enabled: bool = True
    model_name: str = "ViT-L-14"
    pretrained: str | None = None
    aesthetic_weights: str | None = None
    frames_per_forward: int = 24
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=2))

    def missing_setting(self) -> str | None:
        if self.model_name.startswith("local-dir:") or self.pretrained:
            return None
        return "scorers.clip.pretrained (a local open_clip weights file) or scorers.clip.model_name='local-dir:...'"

    def validate(self) -> None:
        check_ranges(self, "scorers.clip", {"frames_per_forward": (1, None)})
        self.pool.validate("scorers.clip")


@dataclass
class CaptionConfig:
    """CoCa caption of the middle frame (open_clip's CoCa; docs/recipe.md §1).

    model_name: 'coca_ViT-L-14' (or another open_clip CoCa) or 'local-dir:/path'; pretrained: weights file,
    e.g. the mscoco-finetuned laion2b CoCa. Which caption the trainer uses per sample is
    `dataformat.training_caption`'s mix, a training setting (`StagePreset.caption_mix`).
    """

    enabled: bool = True
    model_name: str = "coca_ViT-L-14"
    pretrained: str | None = None
    decoding: str = "beam_search"  # or "greedy"
    num_beams: int = 3
    max_tokens: int = 30  # including the start token
    min_tokens: int = 5
    frames_per_forward: int = 16
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=2))

    def missing_setting(self) -> str | None:
        if self.model_name.startswith("local-dir:") or self.pretrained:
            return None
        return "scorers.caption.pretrained (a local CoCa weights file) or scorers.caption.model_name='local-dir:...'"

    def validate(self) -> None:
        if self.decoding not in ("beam_search", "greedy"):
            raise ValueError(f"scorers.caption.decoding must be 'beam_search' or 'greedy', got {self.decoding!r}")
        check_ranges(self, "scorers.caption", {"num_beams": (1, None), "min_tokens": (1, None),
                                               "max_tokens": (self.min_tokens + 1, None),
                                               "frames_per_forward": (1, None)})
        self.pool.validate("scorers.caption")


LLM_SUMMARY_PROMPT = (
    "Two captions describe the same short video clip. A caption of its middle frame: \"{coca}\". "
    "A caption of the whole clip: \"{video}\". Write one sentence that describes the clip, keeping what both "
    "say about its subject, action and setting. Answer with the sentence only."
)


@dataclass
class VideoCaptionConfig:
    """The paper's video captioner: GIT (transformers' GitForCausalLM) over `num_frames` frames of the clip.

    model_path: a local directory written by `save_pretrained` holding a video GIT and its processor
    (e.g. a copy of microsoft/git-large-vatex or git-base-vatex). The decode stage keeps `num_frames`
    frames evenly spread over each clip (from its 2 fps samples) while this scorer is active; the model
    sees as many frames as it has temporal embeddings (`num_image_with_embedding`, 6 for the VATEX GITs).
    """

    enabled: bool = True
    model_path: str | None = None
    num_frames: int = 6
    num_beams: int = 1  # 1 = greedy
    max_new_tokens: int = 30
    clips_per_forward: int = 8
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=2))

    def missing_setting(self) -> str | None:
        return None if self.model_path else "scorers.video_caption.model_path (a local GIT video-captioner directory)"

    def validate(self) -> None:
        check_ranges(self, "scorers.video_caption", {"num_frames": (2, None), "num_beams": (1, None),
                                                     "max_new_tokens": (1, None), "clips_per_forward": (1, None)})
        self.pool.validate("scorers.video_caption")


@dataclass
class LlmSummaryConfig:
    """The paper's third caption: a local causal LM summarises the CoCa and the video caption of a clip.

    model_path: a local directory with a transformers causal LM and its tokenizer (`save_pretrained`), e.g. an
    instruction-tuned Qwen2.5 or SmolLM2. `prompt` gets the two captions as {coca} and {video}; it is sent
    through the tokenizer's chat template when it has one. Decoding is greedy with at most `max_new_tokens`.
    """

    enabled: bool = True
    model_path: str | None = None
    prompt: str = LLM_SUMMARY_PROMPT
    max_new_tokens: int = 60
    clips_per_forward: int = 16
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=1))

    def missing_setting(self) -> str | None:
        return None if self.model_path else "scorers.llm_summary.model_path (a local causal-LM directory)"

    def validate(self) -> None:
        if "{coca}" not in self.prompt or "{video}" not in self.prompt:
            raise ValueError("scorers.llm_summary.prompt must contain the placeholders {coca} and {video}")
        check_ranges(self, "scorers.llm_summary", {"max_new_tokens": (1, None), "clips_per_forward": (1, None)})
        self.pool.validate("scorers.llm_summary")


@dataclass
class RaftConfig:
    """RAFT motion for the stage III high-quality subset (docs/recipe.md §1: RAFT at 800x450).

    Frames are sampled at `sample_fps` across the clip, resized to width x height, and the score is the
    mean optical-flow magnitude in pixels per second at that size over all consecutive pairs.
    The `hq` pass keeps LVD-F clips that are in the top part by RAFT motion and by aesthetics
    (the paper picks ~1M of 152M; the exact rule is ours: [open]).
    """

    enabled: bool = True
    architecture: str = "raft_large"  # or "raft_small" (torchvision)
    weights: str | None = None  # path to a torchvision RAFT state dict (e.g. raft_large_C_T_SKHT_V2)
    width: int = 800
    height: int = 450
    sample_fps: float = 2.0
    max_pairs: int = 16  # at most this many frame pairs per clip (evenly spread)
    num_flow_updates: int = 12
    pairs_per_forward: int = 4
    # hq selection among clips kept by LVD-F
    hq_drop_low_motion_percent: float | None = 50.0
    hq_drop_low_aesthetic_percent: float | None = 50.0
    hq_max_text_area: float | None = 0.01
    hq_max_clips: int | None = None  # cap, best aesthetics first (paper scale: ~1M)
    pool: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(actors_per_gpu=1, batch_size=4))

    def missing_setting(self) -> str | None:
        return None if self.weights else "scorers.raft.weights (a torchvision RAFT state dict file)"

    def validate(self) -> None:
        if self.architecture not in ("raft_large", "raft_small"):
            raise ValueError(f"scorers.raft.architecture must be raft_large or raft_small, got {self.architecture!r}")
        # RAFT's correlation pyramid needs >= 128 px per side
        check_ranges(self, "scorers.raft", {"width": (128, None), "height": (128, None), "sample_fps": (1e-3, None),
                                            "max_pairs": (1, None), "num_flow_updates": (1, None),
                                            "pairs_per_forward": (1, None), "hq_max_text_area": (0, 1),
                                            "hq_max_clips": (1, None)})
        for name in ("hq_drop_low_motion_percent", "hq_drop_low_aesthetic_percent"):
            _check_percent(f"scorers.raft.{name}", getattr(self, name))
        self.pool.validate("scorers.raft")


@dataclass
class ScorersConfig:
    """All learned scorers; nested into CurationConfig as `scorers`."""

    text: TextAreaConfig = field(default_factory=TextAreaConfig)
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    video_caption: VideoCaptionConfig = field(default_factory=VideoCaptionConfig)
    llm_summary: LlmSummaryConfig = field(default_factory=LlmSummaryConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    use_ray: bool = True  # False: score in this process (tests of the scorers, one-machine debugging)

    def validate(self) -> None:
        self.text.validate()
        self.clip.validate()
        self.caption.validate()
        self.video_caption.validate()
        self.llm_summary.validate()
        self.raft.validate()

    def unavailable(self) -> dict[str, str]:
        """Enabled scorers that cannot run -> why and the setting to fill (no weights configured, or a scorer
        whose needs are off: the LLM summary without both captioners); derived from the scorer table."""
        from curation.scorers.graph import unavailable_scorers

        return unavailable_scorers(self)

    def active(self) -> list[str]:
        """Per-clip scorers (not RAFT, which runs in the hq pass) that are enabled and can run, in schedule order."""
        from curation.scorers.graph import active_scorers

        return active_scorers(self)

    def spooled_video_frames(self) -> int:
        """Frames per clip the decode stage keeps for the video captioner (0 while it cannot run)."""
        active = self.video_caption.enabled and self.video_caption.missing_setting() is None
        return self.video_caption.num_frames if active else 0


def _check_percent(setting: str, value: float | None) -> None:
    if value is not None and not 0 <= value < 100:
        raise ValueError(f"{setting} is a percentage in [0, 100) or None, got {value}")
