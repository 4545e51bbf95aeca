"""CLIP aesthetics and CLIP text score of a clip (docs/recipe.md §1), from embeddings of first, middle, last frame.

- `aesthetic_score`: the LAION aesthetic predictor applied to each frame's L2-normalised CLIP image
  embedding, averaged over the frames (the predictor was trained on ViT-L/14 embeddings, 768-d).
- `clip_score`: cosine similarity between the clip's caption (CoCa's, or the source's own) and each
  frame's embedding, averaged over the frames. Raw cosine in [-1, 1] (CLIPScore's x100/x2.5 scalings
  change nothing for a percentile rule). A clip without a caption gets None.
- `clip_embedding`: the mean of the frames' L2-normalised image embeddings, normalised again, as float16 bytes:
  the signature near-duplicate removal groups clips by (docs/dedup.md), kept here so nothing runs CLIP twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from common.openclip import frames_to_model_input, load_open_clip, model_input_size, resize_for_model
from curation.scorers.base import chunks, require_file, score_isolated, scorer_device
from curation.scorers.config import ClipScoreConfig
from curation.types import ClipFrames
from dataformat.schema import Column

logger = logging.getLogger(__name__)


def build_aesthetic_predictor(state_dict: dict[str, Any]):
    """The LAION aesthetic head from its state dict, whichever of the two published forms it is.

    'layers.N.*' keys: improved-aesthetic-predictor's MLP (Linear layers with dropout between them and
    no activations; dropout is the identity at inference). 'weight'/'bias' only: the original linear
    probe. Returns (module, input_dim).
    """
    from torch import nn

    class AestheticMLP(nn.Module):
        def __init__(self, layers: list[nn.Module]) -> None:
            super().__init__()
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers(x)

    if set(state_dict) == {"weight", "bias"}:
        weight = state_dict["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
    else:
        linear_index = sorted(
            {int(key.split(".")[1]) for key in state_dict if key.startswith("layers.") and key.endswith(".weight")}
        )
        if not linear_index:
            raise ValueError(f"not a LAION aesthetic predictor state dict (keys: {sorted(state_dict)[:6]}...)")
        layers: list[nn.Module] = [nn.Identity() for _ in range(linear_index[-1] + 1)]
        for index in linear_index:
            weight = state_dict[f"layers.{index}.weight"]
            layers[index] = nn.Linear(weight.shape[1], weight.shape[0])
        head = AestheticMLP(layers)
        weight = state_dict[f"layers.{linear_index[0]}.weight"]
        last = state_dict[f"layers.{linear_index[-1]}.weight"]
        if last.shape[0] != 1:
            raise ValueError(f"aesthetic predictor must end in one output, its last layer has {last.shape[0]}")
    head.load_state_dict(state_dict)
    return head.eval(), int(weight.shape[1])


def load_aesthetic_predictor(path: str, device: str):
    """Load the aesthetic head from `scorers.clip.aesthetic_weights` (a .pth state dict)."""
    import torch

    file = require_file(path, "scorers.clip.aesthetic_weights", "LAION aesthetic predictor")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head, input_dim = build_aesthetic_predictor(state)
    return head.to(device), input_dim


def clip_embedding_bytes(frame_embeddings) -> bytes:
    """A clip's signature for near-duplicate removal: its frames' unit embeddings averaged and normalised,
    stored as little-endian float16 (D x 2 bytes; `curation.dedup` reads it back)."""
    import torch

    mean = torch.nn.functional.normalize(frame_embeddings.float().mean(dim=0), dim=-1)
    return mean.cpu().numpy().astype("<f2").tobytes()


class ClipScorer:
    """`aesthetic_score` and `clip_score` per clip; one CLIP forward covers many clips' frames."""

    name = "clip"
    columns = ("aesthetic_score", "clip_score", "clip_embedding")

    def __init__(self, config: ClipScoreConfig | None = None, device: str = "auto", threads: int = 1) -> None:
        import open_clip

        self.config = config or ClipScoreConfig()
        self.device = scorer_device(self.config, device, threads)
        started = time.perf_counter()
        self.model, self.preprocess_cfg = load_open_clip(
            self.config.model_name, self.config.pretrained, "scorers.clip", self.device
        )
        self.tokenizer = open_clip.get_tokenizer(self.config.model_name)
        self.aesthetic_head = None
        if self.config.aesthetic_weights:
            self.aesthetic_head, input_dim = load_aesthetic_predictor(self.config.aesthetic_weights, self.device)
            embed_dim = self.embed_dim()
            if input_dim != embed_dim:
                raise ValueError(
                    f"scorers.clip.aesthetic_weights expects {input_dim}-d CLIP embeddings but "
                    f"scorers.clip.model_name={self.config.model_name!r} gives {embed_dim}-d "
                    "(the LAION predictor needs ViT-L/14)"
                )
        else:
            logger.warning("aesthetic_score off: set scorers.clip.aesthetic_weights to the LAION predictor .pth")
        self.load_seconds = time.perf_counter() - started

    def embed_dim(self) -> int:
        """Width of the image embedding (what the aesthetic head must accept)."""
        import torch

        with torch.inference_mode():
            probe = torch.zeros(1, 3, *model_input_size(self.preprocess_cfg), device=self.device)
            return int(self.model.encode_image(probe).shape[-1])

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model_name, "pretrained": self.config.pretrained, "device": self.device,
                "aesthetics": self.aesthetic_head is not None}

    def embed_frames(self, frames: np.ndarray):
        """L2-normalised image embeddings (N, D) of model-sized uint8 frames (see `resize_for_model`)."""
        import torch

        parts = []
        with torch.inference_mode():
            for part in chunks(frames, self.config.frames_per_forward):
                x = frames_to_model_input(part, self.preprocess_cfg, self.device)
                parts.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(parts)

    def embed_texts(self, texts: list[str]):
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        import torch

        # Frames of different sizes are each resized to the model's input, so they share one forward.
        counts = [len(clip.frames) for clip in batch]
        sized = [resize_for_model(clip.frames, self.preprocess_cfg) for clip in batch]
        image = self.embed_frames(np.concatenate(sized))
        per_clip = torch.split(image, counts)
        aesthetic = None
        if self.aesthetic_head is not None:
            with torch.inference_mode():
                aesthetic = self.aesthetic_head(image).squeeze(-1).float().cpu()
            aesthetic = torch.split(aesthetic, counts)
        # the source's own caption, else the CoCa caption `annotate` hands over from the caption scorer
        texts = [clip.caption or clip.extra.get(Column.CAPTION) for clip in batch]
        captioned = [i for i, text in enumerate(texts) if text]
        text_sims: dict[int, float] = {}
        if captioned:
            text = self.embed_texts([texts[i] for i in captioned])
            for row, i in enumerate(captioned):
                text_sims[i] = float((per_clip[i] @ text[row]).mean())
        return [
            {
                "aesthetic_score": float(aesthetic[i].mean()) if aesthetic is not None else None,
                "clip_score": text_sims.get(i),
                "clip_embedding": clip_embedding_bytes(per_clip[i]),
            }
            for i in range(len(batch))
        ]

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, "clip", self._score_valid)

