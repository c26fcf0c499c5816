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
    # One half must hold this much more of the breast than the other to tell the chest wall's
    # side; otherwise (a breast centred in the image) the header's laterality decides.
    side_margin: float = 0.1

    def __call__(self, pixels: Array) -> Array:
        rows, cols = self.box(pixels)
        cropped: Array = pixels[rows, cols]
        return cropped

    def box(self, pixels: Array) -> tuple[slice, slice]:
        """(rows, columns) of the breast's bounding box in `pixels`."""
        rows, cols, _ = self.locate(pixels)
        return rows, cols

    def locate(self, pixels: Array) -> tuple[slice, slice, bool | None]:
        """(rows, columns) of the breast's bounding box in `pixels`, and whether its chest
        wall is on the image's right: True or False, or None when the pixels do not say.

        The breast is widest at the chest wall and tapers to the nipple, so the half of the
        image nearer the chest wall holds clearly more of it. Read from the pixels, not the
        header's laterality: scanned films and some exports put every chest wall on the left.
        """
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
        breast = labels == largest
        rows, cols = ndimage.find_objects(breast.astype(np.int32))[0]
        half = breast.shape[1] // 2
        left, right = float(breast[:, :half].sum()), float(breast[:, half:].sum())
        chest_wall_right = None
        if abs(left - right) >= self.side_margin * (left + right):
            chest_wall_right = right > left
        return (
            slice(rows.start * step, min(pixels.shape[0], rows.stop * step)),
            slice(cols.start * step, min(pixels.shape[1], cols.stop * step)),
            chest_wall_right,
        )


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
class InputGeometry:
    """Where a model input came from in its image: enough to map a heatmap back."""

    image_shape: tuple[int, int]
    flipped: bool  # the image was mirrored into canonical orientation
    rows: slice  # the crop, in the (canonically oriented) image
    cols: slice
    resized_shape: tuple[int, int]  # the crop's size inside the padded model input
    input_shape: tuple[int, int]  # the model input's (height, width)


@dataclass(frozen=True)
class Preprocess:
    """The full chain from a decoded [0, 1] image to a model input of (height, width).

    Our models take each input standardised on its own (`normalisation` "per_image") with
    the chest wall on the left. An imported model may want the [0, 1] grey levels ("unit"),
    or a fixed (mean, std) of them, and may have been trained on images as acquired
    (`orient` False: no mirroring; the crop is the same).
    """

    height: int
    width: int
    normalisation: str | tuple[float, float] = "per_image"
    orient: bool = True

    def __call__(self, pixels: Array, laterality: Laterality | None) -> Array:
        return self.with_geometry(pixels, laterality)[0]

    def _normalise(self, resized: Array) -> Array:
        if isinstance(self.normalisation, str):
            return Standardize()(resized) if self.normalisation == "per_image" else resized
        mean, std = self.normalisation
        normalised: Array = ((resized - mean) / std).astype(np.float32)
        return normalised

    def with_geometry(
        self, pixels: Array, laterality: Laterality | None
    ) -> tuple[Array, InputGeometry]:
        resized, geometry = self._oriented_crop(pixels, laterality)
        return self._normalise(resized), geometry

    def prepare(
        self, pixels: Array, laterality: Laterality | None
    ) -> tuple[Array, InputGeometry, NDArray[np.float64]]:
        """The model input, its geometry, and the input's statistics (`input_statistics`)
        from the same resized crop."""
        resized, geometry = self._oriented_crop(pixels, laterality)
        return self._normalise(resized), geometry, input_statistics(resized, geometry)

    def _oriented_crop(
        self, pixels: Array, laterality: Laterality | None
    ) -> tuple[Array, InputGeometry]:
        rows, cols, chest_wall_right = BreastCrop().locate(pixels)
        flipped = laterality == Laterality.RIGHT if chest_wall_right is None else chest_wall_right
        flipped = flipped and self.orient
        if flipped:  # the box, in the canonically oriented (mirrored) image
            width = pixels.shape[1]
            cols = slice(width - cols.stop, width - cols.start)
            oriented = np.ascontiguousarray(pixels[:, ::-1])
        else:
            oriented = pixels
        cropped = oriented[rows, cols]
        scale = min(self.height / cropped.shape[0], self.width / cropped.shape[1])
        geometry = InputGeometry(
            image_shape=(pixels.shape[0], pixels.shape[1]),
            flipped=flipped,
            rows=rows,
            cols=cols,
            resized_shape=(
                max(1, round(cropped.shape[0] * scale)),
                max(1, round(cropped.shape[1] * scale)),
            ),
            input_shape=(self.height, self.width),
        )
        return ResizePad(self.height, self.width)(cropped), geometry


# What `input_statistics` measures, in order, with the smallest difference in it that means
# anything (a floor under the spread a reference learns, as one domain's synthetic images vary
# less than a site's real ones): what an input looks like before standardisation takes its
# level and contrast away. Scale-like figures are logarithms, so that each is about normally
# distributed over a domain's images.
INPUT_STATISTICS = {
    "breast_median": 0.02,  # grey level of the breast after the VOI transform
    "breast_spread_log": 0.05,  # log of its 10th-90th percentile range
    "breast_fraction": 0.03,  # of the crop: how the breast fills it
    "background": 0.01,  # grey level outside the breast
    "saturated_fraction": 0.002,  # pixels at full white: markers, labels, film edges
    "fine_texture_log": 0.05,  # log energy of the finest detail: noise, grain, sharpening
    "coarse_texture_log": 0.05,  # log energy of detail 4x coarser: tissue structure, blur
}


def _laplacian_std(x: NDArray[np.float32], inside: NDArray[np.bool_]) -> float:
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    values = lap[inside[1:-1, 1:-1]]
    return float(values.std()) if values.size > 16 else float(lap.std())


def input_statistics(resized: Array, geometry: InputGeometry) -> NDArray[np.float64]:
    """A compact description of a model input before standardisation (`INPUT_STATISTICS`):
    enough to tell a scanned film or a vendor-processed view from the detector a model was
    trained on. About a millisecond: computed on every other pixel of the resized crop."""
    height, width = geometry.resized_shape
    crop = resized[:height:2, :width:2]
    background = float(np.percentile(crop, 5))
    breast = crop > background + 0.08
    if breast.sum() < 64:  # a crop with no clear breast: describe all of it
        breast = np.ones_like(crop, dtype=bool)
    values = crop[breast]
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    coarse = crop[::4, ::4]
    fine_energy = _laplacian_std(crop, breast)
    coarse_energy = _laplacian_std(coarse, breast[::4, ::4])
    return np.array(
        [
            median,
            np.log(max(1e-4, p90 - p10)),
            breast.mean(),
            background,
            float((crop >= 0.985).mean()),
            np.log(max(1e-5, fine_energy)),
            np.log(max(1e-5, coarse_energy)),
        ],
        dtype=np.float64,
    )


def heatmap_on_image(heatmap: Array, geometry: InputGeometry, *, shrink: int = 4) -> Array:
    """A heatmap over the padded model input (any resolution) mapped onto its image at
    1/`shrink` of the image's size: zero outside the breast crop, in the image's own
    orientation (right breasts mirrored back)."""
    input_h, input_w = geometry.input_shape
    resized_h, resized_w = geometry.resized_shape
    # The part of the map that covers the crop; the rest covers padding.
    crop_box = (
        0.0,
        0.0,
        resized_w * heatmap.shape[1] / input_w,
        resized_h * heatmap.shape[0] / input_h,
    )
    out_h = max(1, geometry.image_shape[0] // shrink)
    out_w = max(1, geometry.image_shape[1] // shrink)
    r0 = min(out_h - 1, geometry.rows.start // shrink)
    c0 = min(out_w - 1, geometry.cols.start // shrink)
    r1 = max(r0 + 1, min(out_h, geometry.rows.stop // shrink))
    c1 = max(c0 + 1, min(out_w, geometry.cols.stop // shrink))
    patch = PILImage.fromarray(heatmap.astype(np.float32), mode="F").resize(
        (c1 - c0, r1 - r0), PILImage.Resampling.BILINEAR, box=crop_box
    )
    out = np.zeros((out_h, out_w), dtype=np.float32)
    out[r0:r1, c0:c1] = np.asarray(patch, dtype=np.float32)
    if geometry.flipped:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def box_in_input(
    box: tuple[int, int, int, int], geometry: InputGeometry
) -> tuple[float, float, float, float] | None:
    """A box (x0, y0, x1, y1) in the image's pixels, in model-input pixels; None when it lies
    wholly outside the breast crop."""
    x0, y0, x1, y1 = box
    if geometry.flipped:
        width = geometry.image_shape[1]
        x0, x1 = width - x1, width - x0
    scale = geometry.resized_shape[0] / max(1, geometry.rows.stop - geometry.rows.start)
    mapped = (
        max(0.0, (x0 - geometry.cols.start) * scale),
        max(0.0, (y0 - geometry.rows.start) * scale),
        min(float(geometry.resized_shape[1]), (x1 - geometry.cols.start) * scale),
        min(float(geometry.resized_shape[0]), (y1 - geometry.rows.start) * scale),
    )
    if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
        return None
    return mapped
