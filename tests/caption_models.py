"""Tiny random-init caption models saved to disk the way the real ones come (transformers `save_pretrained`
directories), with tokenizers built offline from small word lists: a GIT video captioner with temporal
embeddings (GitForCausalLM + GitProcessor) and Llama causal LMs with and without a chat template."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

from curation.types import ClipFrames
from tests.scorer_helpers import footage

_WORD_LIST = (
    "a an the man woman people person bike bikes bicycle rider riders street road city car cars night day "
    "rides riding ride walks walking on in with of and at near along through down up two one clip video "
    "frame caption captions describe describes sentence shows showing moving is are . , : \" answer only "
    "keeping what both say about its subject action setting write whole middle short same"
)
WORDS = sorted(set(_WORD_LIST.split(" ")))
GIT_FRAMES = 6


def _widen(model, std: float) -> None:
    """Random weights of `std` with identity norms: a tiny random model whose output varies with its input
    (at the default init scale every input decodes to the same words)."""
    import torch

    for name, parameter in model.named_parameters():
        if "norm" in name.lower():
            torch.nn.init.ones_(parameter) if name.endswith("weight") else torch.nn.init.zeros_(parameter)
        else:
            torch.nn.init.normal_(parameter, std=std)


def _llama(root: Path, chat: bool, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {word: index for index, word in enumerate(specials + [w for w in WORDS if w not in specials])}
    if chat:
        vocab.update({word: len(vocab) + i for i, word in enumerate(["user", "assistant"])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token=None if chat else "<pad>", unk_token="<unk>")
    if chat:  # a chat model whose tokenizer has no pad token: the scorer pads with its end token
        tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> "
                                   "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _widen(model, std=1.0)  # so the random model's answer depends on its prompt
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)


def _git(root: Path, frames: int | None, seed: int) -> None:
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    root.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = GitConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, num_image_with_embedding=frames,
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    _widen(model, std=1.0)  # so the random captioner's words depend on the frames
    model.save_pretrained(root)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)


@functools.cache
def caption_models() -> dict[str, str]:
    """Save the tiny caption models once per session; returns their directories."""
    root = Path(tempfile.mkdtemp(prefix="lvd-tiny-captioners-"))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    _git(root / "git_video", GIT_FRAMES, seed=1)
    _git(root / "git_image", None, seed=0)
    _llama(root / "llm_chat", chat=True, seed=0)
    _llama(root / "llm_plain", chat=False, seed=1)
    return {name: str(root / name) for name in ("git_video", "git_image", "llm_chat", "llm_plain")}


def video_clips(count: int, frames: int = GIT_FRAMES, start: int = 20, step: int = 37) -> list[ClipFrames]:
    """`count` clips of real footage (bikes.mp4): first/middle/last and `frames` spread frames over 2 s."""
    clips = []
    for i in range(count):
        base = start + i * step
        spread = [min(base + round(k * 50 / frames), 249) for k in range(frames)]
        video = np.stack([footage()[index] for index in spread])
        clips.append(ClipFrames(f"video-{i}", video[[0, frames // 2, -1]].copy(), video_frames=video))
    return clips
