"""Captions (docs/recipe.md §1): CoCa on the middle frame -> `caption`, kept in a `captions` struct next to the other
two captioners of the paper (the video captioner of video_captions.py and the LLM summary of llm_summary.py;
each fills its own entry and `merge_captions` combines them).

open_clip ships CoCa, but its `generate` depends on transformers' BeamSearchScorer, which transformers 5
removed; decoding is therefore done here, batched over clips: greedy, or beam search with the usual
length-normalised scores (score = sum of log-probabilities / length ** length_penalty). The first
`min_tokens` positions cannot end the caption, as in open_clip.

Without configured CoCa weights the scorer is off and `caption` stays null: no caption is ever invented.
The trainer draws one of a clip's captions per sample (`dataformat.training_caption`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from common.openclip import frames_to_model_input, load_open_clip, resize_for_model
from curation.scorers.base import chunks, score_isolated, scorer_device
from curation.scorers.config import CaptionConfig
from curation.types import ClipFrames
from dataformat import CAPTION_SOURCES

logger = logging.getLogger(__name__)

START_TOKEN, END_TOKEN = 49406, 49407  # open_clip's SimpleTokenizer <start_of_text>, <end_of_text>


def empty_captions() -> dict[str, str | None]:
    """The `captions` struct: one entry per captioner of the paper."""
    return dict.fromkeys(CAPTION_SOURCES)


def merge_captions(
    current: dict[str, str | None] | None, update: dict[str, str | None] | None
) -> dict[str, str | None] | None:
    """Combine the `captions` structs that the three captioners fill separately: a caption one of them
    wrote is never replaced by another's empty entry."""
    if not current:
        return dict(update) if update else current
    if not update:
        return current
    return {name: update.get(name) or current.get(name) for name in CAPTION_SOURCES}


def tokens_to_text(tokens: list[int]) -> str:
    """Decode token ids (start/end markers dropped) with open_clip's tokenizer."""
    from open_clip.tokenizer import _tokenizer as tokenizer  # the module's shared SimpleTokenizer

    body = [t for t in tokens if t not in (START_TOKEN, END_TOKEN)]
    return tokenizer.decode(body).strip() if body else ""


class CocaCaptioner:
    """`caption` (+ `captions.coca`) for each clip from CoCa on its middle frame."""

    name = "caption"
    columns = ("caption", "captions")

    def __init__(self, config: CaptionConfig | None = None, device: str = "auto", threads: int = 1) -> None:

        self.config = config or CaptionConfig()
        self.device = scorer_device(self.config, device, threads)
        started = time.perf_counter()
        self.model, self.preprocess_cfg = load_open_clip(
            self.config.model_name, self.config.pretrained, "scorers.caption", self.device
        )
        if not hasattr(self.model, "text_decoder"):
            raise ValueError(f"scorers.caption.model_name={self.config.model_name!r} is not a CoCa model")
        context = int(self.model.text.context_length)
        self.max_tokens = min(self.config.max_tokens, context)
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model_name, "pretrained": self.config.pretrained, "device": self.device,
                "decoding": self.config.decoding}

    def _next_token_logprobs(self, images, image_latent, image_embs, tokens):
        import torch

        out = self.model(images, tokens, image_latent=image_latent, image_embs=image_embs, output_labels=False)
        logprobs = torch.log_softmax(out["logits"][:, -1].float(), dim=-1)
        if tokens.shape[1] < self.config.min_tokens:
            logprobs[:, END_TOKEN] = -float("inf")
        return logprobs

    def greedy(self, images) -> list[list[int]]:
        """Most likely token at each step; finished captions leave the batch so they cost nothing."""
        import torch

        image_latent, image_embs = self.model._encode_image(images)
        count = images.shape[0]
        tokens = torch.full((count, 1), START_TOKEN, dtype=torch.long, device=images.device)
        finished = torch.zeros(count, dtype=torch.bool, device=images.device)
        while tokens.shape[1] < self.max_tokens and not finished.all():
            active = (~finished).nonzero().squeeze(1)
            logprobs = self._next_token_logprobs(
                images[active], image_latent[active], image_embs[active], tokens[active]
            )
            step = torch.full((count,), END_TOKEN, dtype=torch.long, device=images.device)
            step[active] = logprobs.argmax(-1)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            finished |= step == END_TOKEN
        return [_until_end(row) for row in tokens.tolist()]

    def beam_search(self, images) -> list[list[int]]:
        """Beam search per image, all images' beams in one forward per step."""
        import torch

        beams = self.config.num_beams
        length_penalty = 1.0
        image_latent, image_embs = self.model._encode_image(images)
        count = images.shape[0]
        device = images.device
        # running beams of every image: tokens (count, beams, length), scores (count, beams)
        tokens = torch.full((count, beams, 1), START_TOKEN, dtype=torch.long, device=device)
        scores = torch.full((count, beams), -float("inf"), device=device)
        scores[:, 0] = 0.0  # identical beams at the start: expand only the first
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(count)]
        done = [False] * count
        while tokens.shape[2] < self.max_tokens and not all(done):
            active = [i for i in range(count) if not done[i]]
            index = torch.tensor(active, device=device)
            rows = tokens[index].reshape(len(active) * beams, -1)
            repeat = index.repeat_interleave(beams)
            logprobs = self._next_token_logprobs(images[repeat], image_latent[repeat], image_embs[repeat], rows)
            vocab = logprobs.shape[-1]
            candidates = (scores[index][:, :, None] + logprobs.view(len(active), beams, vocab)).view(len(active), -1)
            top_scores, top_ids = candidates.topk(2 * beams, dim=1)
            new_tokens = tokens.new_full((count, beams, tokens.shape[2] + 1), END_TOKEN)
            new_scores = torch.full((count, beams), -float("inf"), device=device)
            length = tokens.shape[2] + 1
            for row, i in enumerate(active):
                kept = 0
                for score, flat in zip(top_scores[row].tolist(), top_ids[row].tolist(), strict=True):
                    beam, token = divmod(flat, vocab)
                    if score == -float("inf"):
                        break
                    sequence = tokens[i, beam].tolist() + [token]
                    if token == END_TOKEN:
                        finished[i].append((score / length**length_penalty, sequence))
                    else:
                        new_tokens[i, kept] = torch.tensor(sequence, device=device)
                        new_scores[i, kept] = score
                        kept += 1
                    if kept == beams:
                        break
                finished[i].sort(key=lambda item: -item[0])
                del finished[i][beams:]
                best_running = new_scores[i].max().item()
                if len(finished[i]) == beams and finished[i][-1][0] >= best_running / length**length_penalty:
                    done[i] = True
            tokens, scores = new_tokens, new_scores
        results = []
        length = tokens.shape[2]
        for i in range(count):
            pool = list(finished[i])
            if not done[i]:  # ran out of length: running beams compete as they are
                pool += [(scores[i, b].item() / length**length_penalty, tokens[i, b].tolist()) for b in range(beams)
                         if scores[i, b].item() > -float("inf")]
            best = max(pool, key=lambda item: item[0])[1]
            results.append(_until_end(best))
        return results

    def caption_frames(self, frames: np.ndarray) -> list[str]:
        """Captions for model-sized uint8 frames (N, h, w, 3), `frames_per_forward` at a time."""
        import torch

        texts: list[str] = []
        with torch.inference_mode():
            for part in chunks(frames, self.config.frames_per_forward):
                images = frames_to_model_input(part, self.preprocess_cfg, self.device)
                if self.config.decoding == "greedy" or self.config.num_beams == 1:
                    ids = self.greedy(images)
                else:
                    ids = self.beam_search(images)
                texts.extend(tokens_to_text(row) for row in ids)
        return texts

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        middle = np.concatenate(
            [resize_for_model(clip.frames[len(clip.frames) // 2 : len(clip.frames) // 2 + 1], self.preprocess_cfg)
             for clip in batch]
        )
        rows = []
        for text in self.caption_frames(middle):
            if not text:
                rows.append({"caption": None, "captions": None, "error": "caption: CoCa produced an empty caption"})
                continue
            captions = empty_captions()
            captions["coca"] = text
            rows.append({"caption": text, "captions": captions})
        return rows

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, "caption", self._score_valid)


def _until_end(tokens: list[int]) -> list[int]:
    """Tokens up to (not including) the first end token."""
    return tokens[: tokens.index(END_TOKEN)] if END_TOKEN in tokens else tokens
