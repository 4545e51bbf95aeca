"""Shared helpers every other package may use: video writing/decoding, resize-cover-crop, device choice,
open_clip loading, weight-path checks. A leaf: imports nothing from the rest of the project."""
