"""The PNGs a viewer shows, rendered once by the worker while it holds the pixels: the
greyscale heatmap, its colour overlay, and a small preview of the image. The results service
only streams the stored bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

# At or below this per-position probability the overlay is fully transparent: it marks only
# the places where the model's local evidence favours malignancy, instead of tinting the
# whole breast. Colour and opacity rise from there to 1.
TRANSPARENT_BELOW = 0.5
# Previews (and heatmaps) at 1/4 of the image's size: enough for a viewer's four-up page.
PREVIEW_SHRINK = 4


def colour_map(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8: blue through green and yellow to red."""
    stops = np.array([0.0, 0.33, 0.66, 1.0])
    colours = np.array([[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    channels = [np.interp(heat, stops, colours[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    # zlib's fastest level: these are small images written once per screened image, on the
    # worker's CPU, and level 6 cost more time than the bytes it saved.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grey_png(levels: np.ndarray) -> bytes:
    """An (H, W) uint8 greyscale image as a PNG."""
    return _png(PILImage.fromarray(levels, mode="L"))


def heatmap_pngs(heat: np.ndarray) -> tuple[bytes, bytes]:
    """(greyscale, overlay) PNGs of one (H, W) heatmap of per-position probability in [0, 1]."""
    grey = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    # The overlay is drawn from the stored 8-bit values, so both show exactly the same map.
    return _png(PILImage.fromarray(grey, mode="L")), overlay_png(grey.astype(np.float32) / 255)


def preview_png(pixels: np.ndarray, shrink: int) -> bytes:
    """An (H, W) display-ready image in [0, 1] as an 8-bit greyscale PNG at 1/`shrink` size,
    in its own orientation (as heatmaps)."""
    height, width = pixels.shape
    grey = PILImage.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    if width < shrink or height < shrink:
        return _png(grey.resize((max(1, width // shrink), max(1, height // shrink))))
    # The mean of each shrink x shrink block (over whole blocks: the size rounds down).
    return _png(grey.reduce(shrink, box=(0, 0, width - width % shrink, height - height % shrink)))


def overlay_rgba(heat: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 overlay of a heatmap in [0, 1]: colour by probability, opacity rising
    with it."""
    strength = np.clip((heat - TRANSPARENT_BELOW) / (1 - TRANSPARENT_BELOW), 0, 1)
    alpha = np.sqrt(strength) * 200
    return np.dstack([colour_map(strength), alpha.round().astype(np.uint8)])


def overlay_png(heat: np.ndarray) -> bytes:
    return _png(PILImage.fromarray(overlay_rgba(heat), mode="RGBA"))


def burn_in(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W) display-ready pixels in [0, 1] with the same-sized heatmap's overlay laid on
    them, as a viewer would show it: (H, W, 3) uint8."""
    rgba = overlay_rgba(heat).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    grey = np.clip(pixels, 0, 1)[..., np.newaxis] * 255.0
    return np.asarray(np.round(grey * (1 - alpha) + rgba[..., :3] * alpha), dtype=np.uint8)
