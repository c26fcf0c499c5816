"""Model-input preprocessing, in two stages.

- On the host, per image (`Preprocess.place`): where the model input comes from. The breast
  is found on a coarse view of the image (one pixel in k, looked up through the image's grey
  table), which gives the crop, the orientation and the resized size: an `InputGeometry`.
- On the model's device, per batch (`Preprocess.make_inputs`): the image's stored values
  (16-bit integers: all that crosses the bus to a GPU) are looked up through their table,
  cropped, mirrored, resized (bilinear with antialiasing, as Pillow resizes) and
  standardised into the batch tensor; the input statistics and the preview come from the
  same tensors. On a CPU-only machine the same torch code runs on CPU tensors.

Grey-level arrays are 2-D float32, rows x columns, in [0, 1] unless a function says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image as PILImage
from scipy import ndimage

from shared.db.models import Laterality
from shared.imaging.decode import StoredPixels
from shared.imaging.formats import ImageRejected, RejectCode

Array = NDArray[np.float32]
# An image as the preprocessing takes it: stored values with their table, or grey levels.
Source = StoredPixels | Array


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

    def step(self, shape: tuple[int, int]) -> int:
        """k: the coarse view's spacing for an image of `shape`."""
        return max(1, max(shape) // self.search_size)

    def locate(self, pixels: Array) -> tuple[slice, slice, bool | None]:
        """(rows, columns) of the breast's bounding box in `pixels`, and whether its chest
        wall is on the image's right: True or False, or None when the pixels do not say."""
        step = self.step((pixels.shape[0], pixels.shape[1]))
        return self.locate_coarse(pixels[::step, ::step], step, (pixels.shape[0], pixels.shape[1]))

    def locate_coarse(
        self, coarse: Array, step: int, shape: tuple[int, int]
    ) -> tuple[slice, slice, bool | None]:
        """`locate` from the coarse view (`coarse` = pixels[::step, ::step] of an image of
        `shape`): the full image is never needed.

        The breast is widest at the chest wall and tapers to the nipple, so the half of the
        image nearer the chest wall holds clearly more of it. Read from the pixels, not the
        header's laterality: scanned films and some exports put every chest wall on the left.
        """
        background = _percentile(coarse, 10)
        mask = coarse > background + self.threshold_above_background
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]  # pixels per region
        if count == 0 or float(np.max(sizes)) < self.min_area_fraction * coarse.size:
            raise ImageRejected(
                RejectCode.EMPTY_BREAST_REGION,
                "no breast region stands out from the background; check the image is a "
                "mammogram for presentation and not blank or inverted",
            )
        breast = labels == int(np.argmax(sizes)) + 1
        in_rows = np.flatnonzero(breast.any(axis=1))
        in_cols = np.flatnonzero(breast.any(axis=0))
        rows = slice(int(in_rows[0]), int(in_rows[-1]) + 1)
        cols = slice(int(in_cols[0]), int(in_cols[-1]) + 1)
        half = breast.shape[1] // 2
        left, right = float(breast[:, :half].sum()), float(breast[:, half:].sum())
        chest_wall_right = None
        if abs(left - right) >= self.side_margin * (left + right):
            chest_wall_right = right > left
        return (
            slice(rows.start * step, min(shape[0], rows.stop * step)),
            slice(cols.start * step, min(shape[1], cols.stop * step)),
            chest_wall_right,
        )


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
class InputBatch:
    """A batch of model inputs made on the model's device (`Preprocess.make_inputs`)."""

    inputs: torch.Tensor  # (B, 1, height, width) float32, on the device
    statistics: NDArray[np.float64] | None  # (B, len(INPUT_STATISTICS)), when asked for
    previews: list[NDArray[np.uint8]]  # each image at 1/shrink of its size, when asked for

    @staticmethod
    def joined(batches: Sequence[InputBatch]) -> InputBatch:
        """Batches made apart (one image each, say) as one."""
        described = [b.statistics for b in batches if b.statistics is not None]
        return InputBatch(
            inputs=torch.cat([b.inputs for b in batches]),
            statistics=np.concatenate(described) if len(described) == len(batches) else None,
            previews=[preview for b in batches for preview in b.previews],
        )


@dataclass(frozen=True)
class Preprocess:
    """The full chain from an image to a model input of (height, width).

    Our models take each input standardised on its own (`normalisation` "per_image") with
    the chest wall on the left. An imported model may want the [0, 1] grey levels ("unit"),
    or a fixed (mean, std) of them, and may have been trained on images as acquired
    (`orient` False: no mirroring; the crop is the same).
    """

    height: int
    width: int
    normalisation: str | tuple[float, float] = "per_image"
    orient: bool = True

    def place(self, image: Source, laterality: Laterality | None) -> InputGeometry:
        """The host's part: crop, orientation and resized size, from a coarse view."""
        crop = BreastCrop()
        shape = _shape(image)
        step = crop.step(shape)
        if isinstance(image, StoredPixels):
            coarse = image.grey_of(image.values[::step, ::step])
        else:
            coarse = image[::step, ::step]
        rows, cols, chest_wall_right = crop.locate_coarse(coarse, step, shape)
        flipped = laterality == Laterality.RIGHT if chest_wall_right is None else chest_wall_right
        flipped = flipped and self.orient
        if flipped:  # the box, in the canonically oriented (mirrored) image
            cols = slice(shape[1] - cols.stop, shape[1] - cols.start)
        crop_h, crop_w = rows.stop - rows.start, cols.stop - cols.start
        scale = min(self.height / crop_h, self.width / crop_w)
        return InputGeometry(
            image_shape=shape,
            flipped=flipped,
            rows=rows,
            cols=cols,
            resized_shape=(max(1, round(crop_h * scale)), max(1, round(crop_w * scale))),
            input_shape=(self.height, self.width),
        )

    def make_inputs(
        self,
        images: Sequence[tuple[Source, InputGeometry]],
        device: torch.device,
        *,
        statistics: bool = False,
        preview_shrink: int = 0,
    ) -> InputBatch:
        """The device's part, for a batch: the model inputs, and (when asked) each input's
        statistics before standardisation (`input_statistics`) and each image's preview (the
        mean of each `preview_shrink` square of its 8-bit grey levels, as `preview_png`)."""
        batch = torch.zeros((len(images), 1, self.height, self.width), device=device)
        previews: list[torch.Tensor] = []
        for index, grey in enumerate(_grey_on_device([image for image, _ in images], device)):
            geometry = images[index][1]
            if preview_shrink:
                previews.append(_preview(grey, preview_shrink))
            resized = _resized_crop(grey, geometry)
            height, width = geometry.resized_shape
            batch[index, 0, :height, :width] = resized
        described = None
        if statistics and images:
            shapes = [geometry.resized_shape for _, geometry in images]
            described = input_statistics(batch, shapes).double().cpu().numpy()
        return InputBatch(
            inputs=self._normalise(batch),
            statistics=described,
            previews=_to_host(previews),
        )

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        if isinstance(self.normalisation, str):
            if self.normalisation != "per_image":
                return batch
            flat = batch.flatten(1)
            mean = flat.mean(dim=1, keepdim=True)
            # Two passes by hand: torch's own std over a dimension is ~8x slower on a CPU.
            std = (flat - mean).square().mean(dim=1, keepdim=True).sqrt()
            return ((flat - mean) / (std + 1e-6)).view_as(batch)  # zero mean, unit variance
        mean_level, std_level = self.normalisation
        return (batch - mean_level) / std_level

    # One image at a time, on the CPU: for training, tools and tests.

    def __call__(self, image: Source, laterality: Laterality | None) -> Array:
        return self.with_geometry(image, laterality)[0]

    def with_geometry(
        self, image: Source, laterality: Laterality | None
    ) -> tuple[Array, InputGeometry]:
        geometry = self.place(image, laterality)
        batch = self.make_inputs([(image, geometry)], torch.device("cpu"))
        return batch.inputs[0, 0].numpy(), geometry

    def prepare(
        self, image: Source, laterality: Laterality | None
    ) -> tuple[Array, InputGeometry, NDArray[np.float64]]:
        """The model input, its geometry, and the input's statistics (`input_statistics`)
        from the same resized crop."""
        geometry = self.place(image, laterality)
        batch = self.make_inputs([(image, geometry)], torch.device("cpu"), statistics=True)
        assert batch.statistics is not None
        return batch.inputs[0, 0].numpy(), geometry, batch.statistics[0]


def _percentile(values: Array, q: float) -> float:
    """np.percentile(values, q) (its default, "linear", to the last bit) from a partition
    alone: np.percentile's own overhead is most of its cost on a coarse view."""
    flat = values.reshape(-1)
    position = q / 100 * (flat.size - 1)
    below = int(position)
    above = min(below + 1, flat.size - 1)
    ordered = np.partition(flat, [below, above])
    low, high, t = ordered[below], ordered[above], position - below
    diff = high - low
    return float(high - diff * (1 - t) if t >= 0.5 else low + diff * t)


def _to_host(arrays: list[torch.Tensor]) -> list[NDArray[np.uint8]]:
    """The batch's previews in one copy from the device (one wait for it, not one each)."""
    if not arrays:
        return []
    flat = torch.cat([array.reshape(-1) for array in arrays]).cpu().numpy()
    bounds = np.cumsum([0] + [array.numel() for array in arrays])
    return [
        flat[start:end].reshape(array.shape)
        for array, start, end in zip(arrays, bounds[:-1], bounds[1:], strict=True)
    ]


def _shape(image: Source) -> tuple[int, int]:
    if isinstance(image, StoredPixels):
        return image.shape
    return image.shape[0], image.shape[1]


def _grey_on_device(images: Sequence[Source], device: torch.device) -> list[torch.Tensor]:
    """Each image's grey levels as an (H, W) float32 tensor on `device`.

    Stored values cross to a GPU as they are (1-2 bytes a pixel, one pinned buffer and one
    copy for the batch, the tables likewise) and are looked up there.
    """
    if device.type == "cpu":
        return [_grey_on_cpu(image) for image in images]
    raw = [_host_bytes(image) for image in images]
    tables = [_table(image) for image in images]
    starts = np.cumsum([0] + [_aligned(r.size) for r in raw])
    table_starts = np.cumsum([0] + [t.size for t in tables])
    staged = torch.empty(int(starts[-1]), dtype=torch.uint8, pin_memory=True)
    staged_tables = torch.empty(int(table_starts[-1]), dtype=torch.float32, pin_memory=True)
    for data, table, start, table_start in zip(raw, tables, starts, table_starts, strict=False):
        staged.numpy()[start : start + data.size] = data
        staged_tables.numpy()[table_start : table_start + table.size] = table
    on_device = staged.to(device, non_blocking=True)
    tables_on_device = staged_tables.to(device, non_blocking=True)
    greys = []
    for index, image in enumerate(images):
        start = int(starts[index])
        values = on_device[start : start + raw[index].size].view(_torch_dtype(image))
        if isinstance(image, StoredPixels):
            lookup = tables_on_device[int(table_starts[index]) : int(table_starts[index + 1])]
            values = lookup.index_select(0, values.to(torch.int32) - image.low)
        greys.append(values.reshape(_shape(image)))
    return greys


def _aligned(size: int) -> int:
    """`size` rounded up to 16 bytes: each image's values start aligned for any dtype."""
    return -(-size // 16) * 16


def _grey_on_cpu(image: Source) -> torch.Tensor:
    if not isinstance(image, StoredPixels):
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    # The index in a fresh int32 array: the values may be a read-only view of the file.
    index = np.subtract(image.values, image.low, dtype=np.int32)
    grey = torch.from_numpy(image.table).index_select(0, torch.from_numpy(index).view(-1))
    return grey.view(image.shape)


def _host_bytes(image: Source) -> NDArray[np.uint8]:
    values = image.values if isinstance(image, StoredPixels) else image.astype(np.float32)
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _table(image: Source) -> NDArray[np.float32]:
    if isinstance(image, StoredPixels):
        return image.table
    return np.zeros(0, dtype=np.float32)


def _torch_dtype(image: Source) -> torch.dtype:
    if not isinstance(image, StoredPixels):
        return torch.float32
    return {
        np.dtype(np.uint8): torch.uint8,
        np.dtype(np.int8): torch.int8,
        np.dtype(np.uint16): torch.uint16,
        np.dtype(np.int16): torch.int16,
    }[image.values.dtype.newbyteorder("=")]


def _resized_crop(grey: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """The breast's box, in canonical orientation, resized to `resized_shape`."""
    cols = geometry.cols
    if geometry.flipped:  # the box in the image as stored, then the crop mirrored
        width = geometry.image_shape[1]
        cols = slice(width - cols.stop, width - cols.start)
    crop = grey[geometry.rows, cols]
    if geometry.flipped:
        crop = crop.flip(1)
    resized = F.interpolate(
        crop[None, None],
        size=geometry.resized_shape,
        mode="bilinear",
        antialias=True,  # Pillow's bilinear: averages every pixel when shrinking
        align_corners=False,
    )
    return resized[0, 0]


def _preview(grey: torch.Tensor, shrink: int) -> torch.Tensor:
    """The mean of each whole shrink x shrink block of the 8-bit grey levels, rounded half
    up (Pillow's reduce, which `preview_png` uses)."""
    height, width = grey.shape
    whole = grey[: height - height % shrink, : width - width % shrink]
    levels = (whole * 255).round_()  # grey levels are in [0, 1] by construction
    rows, cols = levels.shape[0] // shrink, levels.shape[1] // shrink
    # Block sums as two strided sums: avg_pool2d costs ~1.7x as much on a CPU.
    sums = levels.reshape(rows, shrink, -1).sum(1).view(rows, cols, shrink).sum(2)
    means = sums / (shrink * shrink)
    return torch.floor(means + 0.5).to(torch.uint8)


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


def _percentiles(values: torch.Tensor, inside: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """numpy's default ("linear") percentiles of each image's `values` where `inside`
    ((B, ...) each), as (B, len(qs)): one sort for the batch, and no host round trip (a
    boolean index would wait for the device to say how many)."""
    ordered = _sorted(torch.where(inside, values, torch.inf).flatten(1))
    count = inside.flatten(1).sum(1, keepdim=True)
    fractions = torch.tensor(qs, dtype=torch.float32, device=values.device) / 100
    positions = fractions[None, :] * (count - 1)
    below = positions.floor().long()
    above = torch.minimum(below + 1, count - 1)
    low, high = ordered.gather(1, below), ordered.gather(1, above)
    return low + (positions - below) * (high - low)


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted."""
    if values.device.type == "cpu":  # numpy's sort: about 15x torch's on one CPU thread
        return torch.from_numpy(np.sort(values.numpy(), axis=1))
    return values.sort(dim=1).values


def _masked_spread(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The standard deviation of each image's `values` where `mask`, (B,)."""
    count = mask.flatten(1).sum(1).clamp(min=1)
    mean = torch.where(mask, values, 0).flatten(1).sum(1) / count
    deviations = torch.where(mask, values - mean[:, None, None], 0)
    return (deviations.square().flatten(1).sum(1) / count).sqrt()


def _laplacian_std(x: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The spread of each image's 5-point Laplacian inside the breast (over all of its crop
    when under 17 of its pixels are), (B,). `valid` is each image's crop within the padded
    batch (a rectangle from the top-left corner): the Laplacian is defined where all four
    neighbours are in it."""
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    interior = valid[:, 2:, 2:]  # the neighbours below and right are in the crop
    mask = inside[:, 1:-1, 1:-1] & interior
    enough = mask.flatten(1).sum(1) > 16
    return torch.where(enough, _masked_spread(lap, mask), _masked_spread(lap, interior))


def input_statistics(
    batch: torch.Tensor, resized_shapes: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """A compact description of each model input before standardisation
    (`INPUT_STATISTICS`), (B, 7): enough to tell a scanned film or a vendor-processed view
    from the detector a model was trained on. `batch` is (B, 1, H, W) with each resized crop
    in its top-left corner (`resized_shapes`) and zeros around it; the statistics are each
    crop's own, on every other pixel, computed for the whole batch at once on its device (one
    image at a time cost over a hundred kernel launches each on a GPU)."""
    crop = batch[:, 0, ::2, ::2]
    heights = torch.tensor([(h + 1) // 2 for h, _ in resized_shapes], device=batch.device)
    widths = torch.tensor([(w + 1) // 2 for _, w in resized_shapes], device=batch.device)
    rows = torch.arange(crop.shape[1], device=batch.device)[None, :, None]
    cols = torch.arange(crop.shape[2], device=batch.device)[None, None, :]
    valid = (rows < heights[:, None, None]) & (cols < widths[:, None, None])
    background = _percentiles(crop, valid, [5])[:, 0]
    breast = (crop > (background + 0.08)[:, None, None]) & valid
    unclear = breast.flatten(1).sum(1) < 64  # no clear breast: describe all of the crop
    breast = torch.where(unclear[:, None, None], valid, breast)
    p10, median, p90 = _percentiles(crop, breast, [10, 50, 90]).unbind(1)
    pixels = valid.flatten(1).sum(1)
    fine_energy = _laplacian_std(crop, breast, valid)
    coarse_energy = _laplacian_std(crop[:, ::4, ::4], breast[:, ::4, ::4], valid[:, ::4, ::4])
    return torch.stack(
        [
            median,
            (p90 - p10).clamp(min=1e-4).log(),
            breast.flatten(1).sum(1) / pixels,
            background,
            ((crop >= 0.985) & valid).flatten(1).sum(1) / pixels,
            fine_energy.clamp(min=1e-5).log(),
            coarse_energy.clamp(min=1e-5).log(),
        ],
        dim=1,
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
