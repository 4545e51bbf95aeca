"""Pieces of the Prefect markdown artifacts every flow publishes (images inline: artifacts hold no files)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

IMAGE_TYPES = {".gif": "gif", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def inline_image(path: str | Path, alt: str) -> str:
    """`![alt](data:...)` with the file's bytes: the Prefect UI shows it without access to the run's disk."""
    path = Path(path)
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"![{alt}](data:image/{IMAGE_TYPES[path.suffix.lower()]};base64,{encoded})"


def settings_table(settings: dict[str, Any]) -> list[str]:
    """A two-column markdown table of a run's settings, sorted by name."""
    return ["| setting | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in sorted(settings.items()))]
