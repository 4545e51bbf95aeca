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
from dataclasses import dataclass
from pathlib import Path

from common.requests import SettingError, Settings, setting

TEXT_BACKENDS = ("auto", "ppocr", "craft")
CAPTION_DECODINGS = ("beam_search", "greedy")
RAFT_ARCHITECTURES = ("raft_large", "raft_small")  # torchvision's (curation/scorers/raft_motion.py: build_raft)


@dataclass(frozen=True)
class ActorPoolConfig(Settings):
    """How one model is spread over Ray actors. One model load per actor; each call scores a batch.

    `num_gpus=None` means: 1 / `actors_per_gpu` when the Ray cluster has GPUs, else 0 (CPU actors).
    `num_actors=None` means: GPUs in the cluster x `actors_per_gpu`, or 1 on a CPU-only cluster.
    """

    num_actors: int | None = setting(None, min=1, help="actors of the pool; None: GPUs x actors_per_gpu, or 1")
    num_gpus: float | None = setting(None, min=0, help="GPU share per actor; None: 1 / actors_per_gpu on GPUs")
    actors_per_gpu: int = setting(2, min=1, help="actors sharing one GPU")
    num_cpus: float = setting(1.0, min=0, help="CPUs Ray reserves per actor")
    torch_threads: int = setting(1, min=1, help="intra-op threads per actor; CPU actors should not oversubscribe "
                                                "their cores")
    batch_size: int = setting(16, min=1, help="clips per actor call (amortises the object-store round trip)")
    max_batches_in_flight: int = setting(2, min=1, help="per actor; bounds memory while keeping each actor's "
                                                        "queue non-empty")


def easyocr_model_dir() -> Path:
    """Where EasyOCR keeps `craft_mlt_25k.pth` (EASYOCR_MODULE_PATH or MODULE_PATH or ~/.EasyOCR, + /model)."""
    base = os.environ.get("EASYOCR_MODULE_PATH") or os.environ.get("MODULE_PATH") or "~/.EasyOCR"
    return Path(base).expanduser() / "model"


def _pool(**defaults: float) -> ActorPoolConfig:
    """A scorer's pool setting: its own defaults (how many actors share a GPU, batch size)."""
    return setting(default_factory=lambda: ActorPoolConfig(**defaults), help="how its model is spread over Ray actors")


@dataclass(frozen=True)
class TextAreaConfig(Settings):
    """Text area on the first, middle and last frame (docs/recipe.md §1: the CRAFT detector).

    backend: 'craft' = EasyOCR's CRAFT detector (the paper's), 'ppocr' = the PP-OCRv4 detector bundled
    with rapidocr-onnxruntime, 'auto' = CRAFT when its weights are found, else PP-OCR.
    """

    enabled: bool = setting(True, help="measure the text area of each clip")
    backend: str = setting("auto", choices=TEXT_BACKENDS, help="'craft' (EasyOCR's CRAFT, the paper's), 'ppocr' "
                                                               "(PP-OCRv4 of rapidocr), 'auto' (CRAFT when its "
                                                               "weights are found, else PP-OCR)")
    craft_weights: str | None = setting(None, help="path to craft_mlt_25k.pth; None: look in EasyOCR's model dir")
    ppocr_det_model: str | None = setting(None, help="path to a PP-OCR det .onnx; None: the one rapidocr ships")
    det_long_side: int = setting(640, min=32, help="frames are resized so the long side is this (multiple of 32) "
                                                   "for detection")
    frames_per_forward: int | None = setting(None, min=1, help="frames per detector forward; None = 1 on CPU "
                                                               "(batching 640 px frames is slower there, see "
                                                               "benchmarks/scorers.py) and 16 on a GPU")
    ppocr_pixel_threshold: float = setting(0.3, min=0, max=1, help="PP-OCR DB pixel threshold (rapidocr's)")
    ppocr_box_threshold: float = setting(0.5, min=0, max=1, help="PP-OCR DB box threshold (rapidocr's)")
    ppocr_unclip_ratio: float = setting(1.6, min=0, help="PP-OCR DB unclip ratio (rapidocr's)")
    craft_text_threshold: float = setting(0.7, min=0, max=1, help="CRAFT text threshold (EasyOCR's)")
    craft_link_threshold: float = setting(0.4, min=0, max=1, help="CRAFT link threshold (EasyOCR's)")
    craft_low_text: float = setting(0.4, min=0, max=1, help="CRAFT low-text bound (EasyOCR's)")
    pool: ActorPoolConfig = _pool(actors_per_gpu=4)

    def resolved_craft_weights(self) -> Path | None:
        """The CRAFT weights to use, or None when there are none (then 'auto' falls back to PP-OCR)."""
        if self.craft_weights:
            return Path(self.craft_weights).expanduser()
        candidate = easyocr_model_dir() / "craft_mlt_25k.pth"
        return candidate if candidate.is_file() else None

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "craft" if self.resolved_craft_weights() is not None else "ppocr"

    def can_use_gpu(self) -> bool:
        """PP-OCR runs on onnxruntime: without its CUDA provider (the CPU wheel) a GPU would sit idle."""
        if self.resolved_backend() != "ppocr":
            return True
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()

    def validate(self) -> None:
        if self.det_long_side % 32:
            raise SettingError("det_long_side", f"must be a multiple of 32, got {self.det_long_side}")


@dataclass(frozen=True)
class ClipScoreConfig(Settings):
    """CLIP embeddings of first/middle/last frame -> LAION aesthetic score and caption-frame similarity.

    model_name: an open_clip architecture ('ViT-L-14', matching the LAION predictor's 768-d input) or
    'local-dir:/path' holding open_clip_config.json + weights. pretrained: a weights file (or an
    open_clip tag already in its cache). aesthetic_weights: the LAION aesthetic predictor (.pth; the
    MLP 'sac+logos+ava1-l14-linearMSE.pth' or the linear 'sa_0_4_vit_l_14_linear.pth').
    """

    enabled: bool = setting(True, help="score aesthetics and caption-frame similarity with CLIP")
    model_name: str = setting("ViT-L-14", help="an open_clip architecture or 'local-dir:/path'")
    pretrained: str | None = setting(None, help="CLIP weights file (or an open_clip tag already in its cache)")
    aesthetic_weights: str | None = setting(None, help="the LAION aesthetic predictor (.pth)")
    frames_per_forward: int = setting(24, min=1, help="frames per CLIP image forward")
    pool: ActorPoolConfig = _pool(actors_per_gpu=2)

    def missing_setting(self) -> str | None:
        if self.model_name.startswith("local-dir:") or self.pretrained:
            return None
        return "scorers.clip.pretrained (a local open_clip weights file) or scorers.clip.model_name='local-dir:...'"



@dataclass(frozen=True)
class CaptionConfig(Settings):
    """CoCa caption of the middle frame (open_clip's CoCa; docs/recipe.md §1).

    model_name: 'coca_ViT-L-14' (or another open_clip CoCa) or 'local-dir:/path'; pretrained: weights file,
    e.g. the mscoco-finetuned laion2b CoCa. Which caption the trainer uses per sample is
    `dataformat.training_caption`'s mix, a training setting (`StagePreset.caption_mix`).
    """

    enabled: bool = setting(True, help="caption the middle frame with CoCa")
    model_name: str = setting("coca_ViT-L-14", help="an open_clip CoCa architecture or 'local-dir:/path'")
    pretrained: str | None = setting(None, help="CoCa weights file (e.g. the mscoco-finetuned laion2b CoCa)")
    decoding: str = setting("beam_search", choices=CAPTION_DECODINGS, help="how the caption is decoded")
    num_beams: int = setting(3, min=1, help="beams of the beam search")
    max_tokens: int = setting(30, min=2, help="caption length limit, the start token included")
    min_tokens: int = setting(5, min=1, help="shortest caption in tokens")
    frames_per_forward: int = setting(16, min=1, help="frames per CoCa forward")
    pool: ActorPoolConfig = _pool(actors_per_gpu=2)

    def missing_setting(self) -> str | None:
        if self.model_name.startswith("local-dir:") or self.pretrained:
            return None
        return "scorers.caption.pretrained (a local CoCa weights file) or scorers.caption.model_name='local-dir:...'"

    def validate(self) -> None:
        if self.max_tokens <= self.min_tokens:
            raise SettingError("max_tokens", f"must be > min_tokens ({self.min_tokens}), got {self.max_tokens}")


LLM_SUMMARY_PROMPT = (
    "Two captions describe the same short video clip. A caption of its middle frame: \"{coca}\". "
    "A caption of the whole clip: \"{video}\". Write one sentence that describes the clip, keeping what both "
    "say about its subject, action and setting. Answer with the sentence only."
)


@dataclass(frozen=True)
class VideoCaptionConfig(Settings):
    """The paper's video captioner: GIT (transformers' GitForCausalLM) over `num_frames` frames of the clip.

    model_path: a local directory written by `save_pretrained` holding a video GIT and its processor
    (e.g. a copy of microsoft/git-large-vatex or git-base-vatex). The decode stage keeps `num_frames`
    frames evenly spread over each clip (from its 2 fps samples) while this scorer is active; the model
    sees as many frames as it has temporal embeddings (`num_image_with_embedding`, 6 for the VATEX GITs).
    """

    enabled: bool = setting(True, help="caption each clip with a GIT video captioner")
    model_path: str | None = setting(None, help="local directory of a video GIT and its processor "
                                                "(`save_pretrained`)")
    num_frames: int = setting(6, min=2, help="frames of each clip the captioner sees")
    num_beams: int = setting(1, min=1, help="beams (1 = greedy)")
    max_new_tokens: int = setting(30, min=1, help="caption length limit in tokens")
    clips_per_forward: int = setting(8, min=1, help="clips per GIT forward")
    pool: ActorPoolConfig = _pool(actors_per_gpu=2)

    def missing_setting(self) -> str | None:
        return None if self.model_path else "scorers.video_caption.model_path (a local GIT video-captioner directory)"



@dataclass(frozen=True)
class LlmSummaryConfig(Settings):
    """The paper's third caption: a local causal LM summarises the CoCa and the video caption of a clip.

    model_path: a local directory with a transformers causal LM and its tokenizer (`save_pretrained`), e.g. an
    instruction-tuned Qwen2.5 or SmolLM2. `prompt` gets the two captions as {coca} and {video}; it is sent
    through the tokenizer's chat template when it has one. Decoding is greedy with at most `max_new_tokens`.
    """

    enabled: bool = setting(True, help="summarise the CoCa and the video caption with a local causal LM")
    model_path: str | None = setting(None, help="local directory of a transformers causal LM and its tokenizer")
    prompt: str = setting(LLM_SUMMARY_PROMPT, help="the instruction; gets the two captions as {coca} and {video}")
    max_new_tokens: int = setting(60, min=1, help="summary length limit in tokens")
    clips_per_forward: int = setting(16, min=1, help="clips per LM forward")
    pool: ActorPoolConfig = _pool(actors_per_gpu=1)

    def missing_setting(self) -> str | None:
        return None if self.model_path else "scorers.llm_summary.model_path (a local causal-LM directory)"

    def validate(self) -> None:
        if "{coca}" not in self.prompt or "{video}" not in self.prompt:
            raise SettingError("prompt", "must contain the placeholders {coca} and {video}")


@dataclass(frozen=True)
class RaftConfig(Settings):
    """RAFT motion for the stage III high-quality subset (docs/recipe.md §1: RAFT at 800x450).

    Frames are sampled at `sample_fps` across the clip, resized to width x height, and the score is the
    mean optical-flow magnitude in pixels per second at that size over all consecutive pairs.
    The `hq` pass keeps LVD-F clips that are in the top part by RAFT motion and by aesthetics
    (the paper picks ~1M of 152M; the exact rule is ours: [open]).
    """

    enabled: bool = setting(True, help="measure RAFT motion in the hq pass")
    architecture: str = setting("raft_large", choices=RAFT_ARCHITECTURES, help="torchvision RAFT model")
    weights: str | None = setting(None, help="path to a torchvision RAFT state dict (e.g. raft_large_C_T_SKHT_V2)")
    width: int = setting(800, min=128, help="frames are resized to this width for RAFT (its correlation pyramid "
                                            "needs >= 128 px per side)")
    height: int = setting(450, min=128, help="and to this height")
    sample_fps: float = setting(2.0, min=1e-3, help="frames per second sampled across the clip")
    max_pairs: int = setting(16, min=1, help="at most this many frame pairs per clip (evenly spread)")
    num_flow_updates: int = setting(12, min=1, help="RAFT's recurrent refinement steps")
    pairs_per_forward: int = setting(4, min=1, help="frame pairs per RAFT forward")
    hq_drop_low_motion_percent: float | None = setting(50.0, min=0, max=100, help="hq: drop this percentage of "
                                                       "LVD-F clips with the least RAFT motion (None: keep all)")
    hq_drop_low_aesthetic_percent: float | None = setting(50.0, min=0, max=100, help="hq: drop this percentage "
                                                          "with the lowest aesthetics (None: keep all)")
    hq_max_text_area: float | None = setting(0.01, min=0, max=1, help="hq: most text area a clip may have")
    hq_max_clips: int | None = setting(None, min=1, help="hq: cap, best aesthetics first (paper scale: ~1M)")
    pool: ActorPoolConfig = _pool(actors_per_gpu=1, batch_size=4)

    def missing_setting(self) -> str | None:
        return None if self.weights else "scorers.raft.weights (a torchvision RAFT state dict file)"

    def validate(self) -> None:
        for name in ("hq_drop_low_motion_percent", "hq_drop_low_aesthetic_percent"):
            if getattr(self, name) == 100:  # the one bound min/max cannot say: an open interval
                raise SettingError(name, "must be < 100 (dropping every clip leaves no hq subset), got 100")


@dataclass(frozen=True)
class ScorersConfig(Settings):
    """All learned scorers; nested into CurationConfig as `scorers`. Each section checks its own settings."""

    text: TextAreaConfig = setting(default_factory=TextAreaConfig, help="the text-area scorer")
    clip: ClipScoreConfig = setting(default_factory=ClipScoreConfig, help="the CLIP aesthetic and text scores")
    caption: CaptionConfig = setting(default_factory=CaptionConfig, help="the CoCa middle-frame caption")
    video_caption: VideoCaptionConfig = setting(default_factory=VideoCaptionConfig, help="the GIT video caption")
    llm_summary: LlmSummaryConfig = setting(default_factory=LlmSummaryConfig, help="the LLM summary of both captions")
    raft: RaftConfig = setting(default_factory=RaftConfig, help="RAFT motion and the hq selection")
    use_ray: bool = setting(True, help="score on Ray actor pools; false: in this process (tests of the scorers, "
                                       "one-machine debugging)")

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
