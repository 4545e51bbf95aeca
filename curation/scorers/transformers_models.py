"""Loading transformers models for the caption scorers from local directories (never from a hub).

Both the video captioner and the LLM summariser take a directory written by `save_pretrained` (a model
and its processor or tokenizer). Whatever goes wrong while loading becomes one error that names the
setting to fix, so a bad path is found before the first clip, not as a stack trace inside an actor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.scorers.base import MissingWeightsError


def require_model_dir(path: str | os.PathLike | None, setting: str, what: str) -> Path:
    """`path` as a directory that looks like a saved transformers model, or an error naming `setting`."""
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what}: no weights configured; set `{setting}` to a local model directory")
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise MissingWeightsError(f"{what}: `{setting}` = {str(path)!r} does not exist or is not a directory")
    if not (resolved / "config.json").is_file():
        raise MissingWeightsError(
            f"{what}: `{setting}` = {str(path)!r} has no config.json (expected a directory written by save_pretrained)"
        )
    return resolved


def load_pretrained(load: Callable[..., Any], path: Path, setting: str, what: str, **kwargs: Any) -> Any:
    """`load(path, local_files_only=True, **kwargs)` with any failure turned into an error naming `setting`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        return load(str(path), local_files_only=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - any loader failure is a configuration problem to report
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ValueError(
            f"{what}: `{setting}` = {str(path)!r} cannot be loaded by transformers: {type(error).__name__}: {detail}"
        ) from error
