"""CLIP text conditioning (docs/recipe.md §2): SD 2.x's OpenCLIP ViT-H text encoder, or a tiny random one for tests.

Real weights load from an SD 2.x checkpoint (path or hub id; `subfolder="text_encoder"`/`"tokenizer"`).
The tiny preset needs no hub either: its tokenizer is built from the BPE merges that open_clip ships
inside its wheel, which is the same vocabulary SD 2.x's CLIPTokenizer uses.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common.cache import clip_tokenizer_cache

MAX_TOKENS = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(directory: Path) -> Path:
    """vocab.json + merges.txt of the CLIP BPE (49,408 tokens), from open_clip's bundled merges file."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        return directory
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_text_encoder(hidden_size: int = 64, seed: int = 0) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A random 2-layer CLIP text encoder with the real CLIP tokenizer (for tests and the demo)."""
    cache = clip_tokenizer_cache()
    tokenizer = CLIPTokenizer(str(write_clip_tokenizer_files(cache) / "vocab.json"), str(cache / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval(), tokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), 77, hidden) token embeddings; an empty prompt is the unconditional context."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    tokens = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device)).last_hidden_state
