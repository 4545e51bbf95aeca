"""Multi-view generation (`lvd generate --image IMG --views N --elevation DEG`): an orbit of N views around the object
in IMG, from an SVD-MV finetune (`lvd train --conditioning multiview`), view 0 being the input's viewpoint.

The camera reaches the model as in training (model/multiview.py): the elevation on a micro-condition, and with an
SV3D-style camera embedding also per-frame [elevation, azimuth relative to view 0] for evenly spaced views.
Multi-view models are trained on objects rendered on white; removing a photo's background is left to the user,
but `white_background_warning` says so in one line when the input's border is not white.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.orbits import DEFAULT_ELEVATION

__all__ = ["DEFAULT_ELEVATION", "white_background_warning", "white_border_fraction"]

WHITE_LEVEL = 240  # a pixel whose three channels are all >= this counts as white background
WHITE_BORDER_FRACTION = 0.9  # below this share of white border pixels the input gets a warning
BORDER = 0.05  # the border is the outer 5 % of the image on each side


def white_border_fraction(image: np.ndarray) -> float:
    """The share of white pixels in the outer `BORDER` of an RGB uint8 image (H, W, 3)."""
    height, width = image.shape[:2]
    band_h, band_w = max(1, round(height * BORDER)), max(1, round(width * BORDER))
    mask = np.zeros((height, width), dtype=bool)
    mask[:band_h], mask[-band_h:], mask[:, :band_w], mask[:, -band_w:] = True, True, True, True
    white = (image[..., :3] >= WHITE_LEVEL).all(axis=-1)
    return float(white[mask].mean())


def white_background_warning(image: Any, source: str) -> str | None:
    """One line when the input does not look like an object on white (what multi-view models were trained on)."""
    fraction = white_border_fraction(np.asarray(image.convert("RGB")))
    if fraction >= WHITE_BORDER_FRACTION:
        return None
    return (f"image {source}: only {100 * fraction:.0f}% of its border is white; multi-view models expect one object "
            "on a white background: remove the background (and composite on white) first")
