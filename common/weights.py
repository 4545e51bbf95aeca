"""Local weight files: no downloads at run time, so a missing file is an error that names the setting to fix."""

from __future__ import annotations

import os
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """Real weights were asked for but are not where the configuration says; the message names the setting."""


def require_file(path: str | os.PathLike | None, setting: str, what: str) -> Path:
    """Return `path` as an existing file, or raise an error naming the configuration `setting` to fix."""
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what}: no weights configured; set `{setting}` to a local file")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise MissingWeightsError(f"{what}: `{setting}` = {str(path)!r} does not exist or is not a file")
    return resolved
