"""Which device a model runs on, decided in one place."""

from __future__ import annotations


def pick_device(requested: str = "auto") -> str:
    """'auto' -> 'cuda' when this process sees a GPU (a Ray actor with num_gpus > 0 does), else 'cpu'."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
