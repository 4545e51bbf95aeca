"""The paper's third caption (docs/recipe.md §1): an LLM summary of the CoCa and video captions of a clip
-> `captions.llm_summary`.

Any causal language model that transformers loads with AutoModelForCausalLM + AutoTokenizer from a local
directory works; an instruction-tuned one (e.g. Qwen2.5-1.5B-Instruct or SmolLM2-1.7B-Instruct) follows
the prompt best. The prompt (`scorers.llm_summary.prompt`, default in config.py and the README) gets the
two captions as {coca} and {video}; it is wrapped in the tokenizer's chat template when the tokenizer has
one. Decoding is greedy (deterministic: the same captions always give the same summary), batched with
left padding, and stops at `max_new_tokens`; the first non-empty line of the answer is kept.

It runs after both captioners have reported for a clip (curation/actors.py feeds it their captions); a
clip that lacks one of the two captions gets an error row, never a summary of half the information.
"""

from __future__ import annotations

import time
from typing import Any

from curation.scorers.base import chunks, score_isolated, scorer_device
from curation.scorers.captions import empty_captions
from curation.scorers.config import LlmSummaryConfig
from curation.scorers.transformers_models import load_pretrained, require_model_dir
from curation.types import ClipFrames

SETTING = "scorers.llm_summary.model_path"
WHAT = "LLM summary"


def clip_captions(clip: ClipFrames) -> dict[str, str | None]:
    """The captions the other captioners gave this clip (actors.py puts them in `extra['captions']`)."""
    return clip.extra.get("captions") or {}


def check_captions(clip: ClipFrames) -> str | None:
    captions = clip_captions(clip)
    missing = [name for name in ("coca", "video") if not captions.get(name)]
    if missing:
        return f"needs both the CoCa and the video caption; missing: {', '.join(missing)}"
    return None


def first_line(text: str) -> str:
    """The answer without surrounding blanks or quotes: its first non-empty line."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


class LlmCaptionSummarizer:
    """`captions.llm_summary` for each clip from a local causal LM, given its CoCa and video captions."""

    name = "llm_summary"
    columns = ("captions",)

    def __init__(self, config: LlmSummaryConfig | None = None, device: str = "auto", threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or LlmSummaryConfig()
        self.device = scorer_device(self.config, device, threads)
        started = time.perf_counter()
        path = require_model_dir(self.config.model_path, SETTING, WHAT)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, SETTING, WHAT)
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, path, SETTING, WHAT,
                                dtype=torch.float16 if self.device.startswith("cuda") else torch.float32)
        if model.config.model_type == "git":
            raise ValueError(f"{WHAT}: `{SETTING}` = {str(path)!r} holds a GIT captioner, not a language model")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{WHAT}: the tokenizer in `{SETTING}` = {str(path)!r} has neither a pad nor an "
                                 "end-of-sequence token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return {"model": self.config.model_path, "device": self.device, "chat_template": self.chat,
                "max_new_tokens": self.config.max_new_tokens}

    def prompt(self, coca: str, video: str) -> str:
        """The text the model continues: the configured prompt with both captions, in the chat template."""
        text = self.config.prompt.replace("{coca}", coca).replace("{video}", video)
        if not self.chat:
            return text + "\n"
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def summarise(self, pairs: list[tuple[str, str]]) -> list[str]:
        """One summary per (coca, video) caption pair, `clips_per_forward` prompts per `generate`."""
        import torch

        out: list[str] = []
        with torch.inference_mode():
            for part in chunks(pairs, self.config.clips_per_forward):
                encoded = self.tokenizer(
                    [self.prompt(coca, video) for coca, video in part], return_tensors="pt", padding=True,
                    add_special_tokens=not self.chat,  # a chat template already writes its special tokens
                ).to(self.device)
                ids = self.model.generate(
                    **encoded,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                answers = self.tokenizer.batch_decode(ids[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                out.extend(first_line(text) for text in answers)
        return out

    def _score_valid(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        pairs = [(clip_captions(clip)["coca"], clip_captions(clip)["video"]) for clip in batch]
        rows = []
        for summary in self.summarise(pairs):
            if not summary:
                rows.append({"captions": None, "error": "llm_summary: the model produced an empty summary"})
                continue
            captions = empty_captions()
            captions["llm_summary"] = summary
            rows.append({"captions": captions})
        return rows

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]:
        return score_isolated(batch, self.columns, self.name, self._score_valid, check_captions, needs_frames=False)
