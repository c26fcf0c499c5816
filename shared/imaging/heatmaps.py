"""Heatmap PNGs: the stored greyscale map and the colour overlay a viewer lays on the image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

# At or below this per-position probability the overlay is fully transparent: it marks only
# the places where the model's local evidence favours malignancy, instead of tinting the
# whole breast. Colour and opacity rise from there to 1.
TRANSPARENT_BELOW = 0.5


def heatmap_png(heat: np.ndarray) -> bytes:
    """The stored form: 8-bit greyscale PNG of per-position malignancy probability
    (0..1 -> 0..255)."""
    buffer = io.BytesIO()
    grey = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    PILImage.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def colour_map(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8: blue through green and yellow to red."""
    stops = np.array([0.0, 0.33, 0.66, 1.0])
    colours = np.array([[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    channels = [np.interp(heat, stops, colours[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay_png(grey_png: bytes) -> bytes:
    """RGBA overlay from a stored greyscale heatmap: colour by probability, opacity rising
    with it."""
    heat = np.asarray(PILImage.open(io.BytesIO(grey_png)).convert("L"), dtype=np.float64) / 255
    strength = np.clip((heat - TRANSPARENT_BELOW) / (1 - TRANSPARENT_BELOW), 0, 1)
    alpha = np.sqrt(strength) * 200
    rgba = np.dstack([colour_map(strength), alpha.round().astype(np.uint8)])
    buffer = io.BytesIO()
    PILImage.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
