"""Model-input preprocessing: small typed transforms, each with one job.

Arrays are 2-D float32, rows x columns, grey levels in [0, 1] unless a transform says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from scipy import ndimage

from shared.db.models import Laterality
from shared.imaging.formats import ImageRejected, RejectCode

Array = NDArray[np.float32]


@dataclass(frozen=True)
class CanonicalOrientation:
    """Flip right breasts left-right so the chest wall is always on the left edge."""

    def __call__(self, pixels: Array, laterality: Laterality | None) -> Array:
        if laterality == Laterality.RIGHT:
            return np.ascontiguousarray(pixels[:, ::-1])
        return pixels


@dataclass(frozen=True)
class BreastCrop:
    """Crop to the bounding box of the breast: the largest bright connected region.

    The background level is estimated from the image's darkest decile rather than assumed to
    be zero, and only the largest connected component counts, so burnt-in labels and markers
    (separate, smaller regions) do not stretch the box.
    """

    threshold_above_background: float = 0.08
    min_area_fraction: float = 0.01  # a "breast" smaller than this is a marker or noise

    # The region is found on a view of about this many rows or columns (every k-th pixel),
    # then the box is scaled back: the crop's edges move by under k pixels, and it costs a
    # fraction of labelling a full-resolution mammogram.
    search_size: int = 256

    def __call__(self, pixels: Array) -> Array:
        step = max(1, max(pixels.shape) // self.search_size)
        coarse = pixels[::step, ::step]
        background = float(np.percentile(coarse, 10))
        mask = coarse > background + self.threshold_above_background
        labels, count = ndimage.label(mask)
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        if count == 0 or float(np.max(sizes)) < self.min_area_fraction * coarse.size:
            raise ImageRejected(
                RejectCode.EMPTY_BREAST_REGION,
                "no breast region stands out from the background; check the image is a "
                "mammogram for presentation and not blank or inverted",
            )
        largest = int(np.argmax(sizes)) + 1
        rows, cols = ndimage.find_objects((labels == largest).astype(np.int32))[0]
        cropped: Array = pixels[
            rows.start * step : min(pixels.shape[0], rows.stop * step),
            cols.start * step : min(pixels.shape[1], cols.stop * step),
        ]
        return cropped


@dataclass(frozen=True)
class ResizePad:
    """Aspect-preserving resize into (height, width), padded with zeros on the bottom/right."""

    height: int
    width: int

    def __call__(self, pixels: Array) -> Array:
        scale = min(self.height / pixels.shape[0], self.width / pixels.shape[1])
        new_h = max(1, round(pixels.shape[0] * scale))
        new_w = max(1, round(pixels.shape[1] * scale))
        resized = PILImage.fromarray(pixels.astype(np.float32), mode="F").resize(
            (new_w, new_h), PILImage.Resampling.BILINEAR
        )
        out = np.zeros((self.height, self.width), dtype=np.float32)
        out[:new_h, :new_w] = np.asarray(resized, dtype=np.float32)
        return out


@dataclass(frozen=True)
class Standardize:
    """Zero mean, unit variance over the whole input (output is unbounded, about [-3, 3])."""

    eps: float = 1e-6

    def __call__(self, pixels: Array) -> Array:
        standardized: Array = ((pixels - pixels.mean()) / (pixels.std() + self.eps)).astype(
            np.float32
        )
        return standardized


@dataclass(frozen=True)
class Preprocess:
    """The full chain from a decoded [0, 1] image to a model input of (height, width)."""

    height: int
    width: int

    def __call__(self, pixels: Array, laterality: Laterality | None) -> Array:
        oriented = CanonicalOrientation()(pixels, laterality)
        cropped = BreastCrop()(oriented)
        return Standardize()(ResizePad(self.height, self.width)(cropped))
