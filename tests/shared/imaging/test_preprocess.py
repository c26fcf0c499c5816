from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from devstack.synth import DicomVariant, SynthOptions, generate_exams
from shared.db.models import Laterality
from shared.imaging.decode import StoredPixels, decode_image, read_pixels
from shared.imaging.formats import ImageRejected, MediaType
from shared.imaging.preprocess import (
    BreastCrop,
    InputGeometry,
    Preprocess,
)
from shared.imaging.renders import preview_png

CUDA = torch.cuda.is_available()


def _breast(background: float = 0.0) -> np.ndarray:
    img = np.full((200, 160), background, dtype=np.float32)
    img[40:160, 0:90] = 0.6  # breast against the left edge
    return img


def test_the_chest_wall_goes_left_whatever_side_the_image_or_header_puts_it() -> None:
    rows, cols = np.mgrid[0:200, 0:160]
    # A half ellipse: widest at the chest wall (left edge), tapering to the nipple.
    left = np.where(((rows - 100) / 60) ** 2 + (cols / 90) ** 2 <= 1, 0.6, 0.0).astype(np.float32)
    right = left[:, ::-1].copy()  # chest wall on the right, as digital right breasts come
    preprocess = Preprocess(64, 48)
    for pixels, laterality, flipped in [
        (left, Laterality.LEFT, False),
        (right, Laterality.RIGHT, True),
        # A scanned film puts every chest wall on the left, the right breast's too; a
        # mislabelled header does not flip a breast the wrong way either.
        (left, Laterality.RIGHT, False),
        (right, Laterality.LEFT, True),
    ]:
        inputs, geometry = preprocess.with_geometry(pixels, laterality)
        assert geometry.flipped is flipped
        assert inputs[:, 0].mean() > inputs[:, -1].mean()  # the chest wall on the left
        assert geometry.cols.start == 0, "the box, in the oriented image"
        assert 85 <= geometry.cols.stop <= 95


def test_a_centred_breast_is_oriented_by_its_laterality() -> None:
    img = np.zeros((200, 160), dtype=np.float32)
    img[40:160, 35:125] = 0.6  # symmetric: the pixels do not tell the chest wall's side
    assert Preprocess(64, 48).with_geometry(img, Laterality.RIGHT)[1].flipped is True
    assert Preprocess(64, 48).with_geometry(img, Laterality.LEFT)[1].flipped is False


@pytest.mark.parametrize("background", [0.0, 0.15])
def test_crop_finds_the_breast_on_a_non_zero_background(background: float) -> None:
    cropped = BreastCrop()(_breast(background))
    assert cropped.shape == (120, 90)


def test_crop_ignores_a_thin_burnt_in_label() -> None:
    img = _breast()
    img[5:8, 120:150] = 1.0  # a small bright marker in the corner
    assert BreastCrop()(img).shape == (120, 90)


def test_crop_of_an_empty_image_is_rejected() -> None:
    with pytest.raises(ImageRejected):
        BreastCrop()(np.zeros((50, 50), dtype=np.float32))


def test_resize_preserves_aspect_and_pads() -> None:
    img = np.zeros((200, 160), dtype=np.float32)
    img[40:90, 0:25] = 1.0  # a 50 x 25 "breast": resized to 100 x 50, padded on the right
    out, geometry = Preprocess(100, 100, normalisation="unit").with_geometry(img, None)
    assert geometry.resized_shape == (100, 50)
    assert out.shape == (100, 100)
    assert out[:, :50].min() == pytest.approx(1.0)
    assert out[:, 51:].max() == 0.0


def test_standardize_gives_zero_mean_unit_variance() -> None:
    out = Preprocess(64, 64)(_breast(0.1), Laterality.LEFT)
    assert abs(float(out.mean())) < 1e-5
    assert float(out.std()) == pytest.approx(1.0, abs=1e-3)


def test_full_chain_output_shape_and_dtype() -> None:
    out = Preprocess(128, 104)(_breast(0.1), Laterality.LEFT)
    assert out.shape == (128, 104)
    assert out.dtype == np.float32


@pytest.fixture(scope="module")
def mammograms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two exams of the generator's three domains, one of them mirrored MONOCHROME1."""
    out = tmp_path_factory.mktemp("mammograms")
    options = SynthOptions(height=384, width=312, pixel_spacing_mm=0.53)
    paths = []
    for style in ("digital", "film", "vendor"):
        variants = (DicomVariant(), DicomVariant(monochrome1=True, burnt_in_label=True))
        paths += [
            i.path
            for i in generate_exams(
                out / style,
                exams=2,
                seed=5,
                options=SynthOptions(**{**options.__dict__, "style": style}),
                variants=variants,
            )
        ]
    return paths


def _pillow_resized_crop(grey: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """The crop as the worker made it before the device stage: mirrored with numpy, resized
    by Pillow's bilinear filter."""
    oriented = grey[:, ::-1] if geometry.flipped else grey
    crop = np.ascontiguousarray(oriented[geometry.rows, geometry.cols])
    height, width = geometry.resized_shape
    resized = PILImage.fromarray(crop, mode="F").resize(
        (width, height), PILImage.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _numpy_statistics(resized: np.ndarray) -> np.ndarray:
    """INPUT_STATISTICS as numpy computes them: the definition the torch version must keep."""
    crop = resized[::2, ::2]
    background = float(np.percentile(crop, 5))
    breast = crop > background + 0.08
    if breast.sum() < 64:
        breast = np.ones_like(crop, dtype=bool)
    p10, median, p90 = np.percentile(crop[breast], [10, 50, 90])

    def laplacian_std(x: np.ndarray, inside: np.ndarray) -> float:
        lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
        values = lap[inside[1:-1, 1:-1]]
        return float(values.std()) if values.size > 16 else float(lap.std())

    return np.array(
        [
            median,
            np.log(max(1e-4, p90 - p10)),
            breast.mean(),
            background,
            float((crop >= 0.985).mean()),
            np.log(max(1e-5, laplacian_std(crop, breast))),
            np.log(max(1e-5, laplacian_std(crop[::4, ::4], breast[::4, ::4]))),
        ]
    )


def test_the_device_stage_keeps_pillows_resize_and_the_statistics_definition(
    mammograms: list[Path],
) -> None:
    preprocess = Preprocess(256, 208, normalisation="unit")
    for path in mammograms:
        stored = read_pixels(path.read_bytes(), MediaType.DICOM)
        geometry = preprocess.place(stored, Laterality.RIGHT)
        batch = preprocess.make_inputs([(stored, geometry)], torch.device("cpu"), statistics=True)
        height, width = geometry.resized_shape
        ours = batch.inputs[0, 0, :height, :width].numpy()
        pillow = _pillow_resized_crop(stored.grey(), geometry)
        assert np.abs(ours - pillow).max() < 1e-4, path.name
        padding = batch.inputs[0, 0].clone()
        padding[:height, :width] = 0
        assert padding.abs().sum() == 0
        assert batch.statistics is not None
        assert np.allclose(batch.statistics[0], _numpy_statistics(ours), atol=1e-5), path.name


def test_stored_values_and_grey_levels_make_the_same_inputs(mammograms: list[Path]) -> None:
    """The worker hands the device stored values and a table; training and tools hand it
    grey levels: the same image must give the same input either way."""
    preprocess = Preprocess(256, 208)
    for path in mammograms:
        data = path.read_bytes()
        stored = read_pixels(data, MediaType.DICOM)
        grey = decode_image(data, MediaType.DICOM)
        assert stored.read_as == "native"
        from_stored = preprocess.prepare(stored, Laterality.LEFT)
        from_grey = preprocess.prepare(grey, Laterality.LEFT)
        assert from_stored[1] == from_grey[1]
        assert np.array_equal(from_stored[0], from_grey[0])
        assert np.array_equal(from_stored[2], from_grey[2])


def test_a_batch_gives_each_image_what_it_gets_alone(mammograms: list[Path]) -> None:
    """Crops of different sizes share one padded batch, and the statistics are computed for
    the whole batch at once: each image's must stay its own."""
    preprocess = Preprocess(256, 208)
    images = []
    for path, laterality in zip(mammograms, [Laterality.LEFT, Laterality.RIGHT] * 6, strict=False):
        stored = read_pixels(path.read_bytes(), MediaType.DICOM)
        images.append((stored, preprocess.place(stored, laterality)))
    assert len({geometry.resized_shape for _, geometry in images}) > 2
    together = preprocess.make_inputs(images, torch.device("cpu"), statistics=True)
    assert together.statistics is not None
    for index, image in enumerate(images):
        alone = preprocess.make_inputs([image], torch.device("cpu"), statistics=True)
        assert alone.statistics is not None
        assert torch.allclose(together.inputs[index], alone.inputs[0], atol=1e-6)
        assert np.allclose(together.statistics[index], alone.statistics[0], atol=1e-6)


def test_the_preview_is_preview_pngs_picture(mammograms: list[Path]) -> None:
    preprocess = Preprocess(256, 208)
    for path in mammograms[:4]:
        data = path.read_bytes()
        stored = read_pixels(data, MediaType.DICOM)
        batch = preprocess.make_inputs(
            [(stored, preprocess.place(stored, None))], torch.device("cpu"), preview_shrink=4
        )
        png = preview_png(decode_image(data, MediaType.DICOM), 4)
        expected = np.asarray(PILImage.open(io.BytesIO(png)))
        assert batch.previews[0].dtype == np.uint8
        assert np.array_equal(batch.previews[0], expected), path.name


def _stored(values: np.ndarray) -> StoredPixels:
    low, high = int(values.min()), int(values.max())
    table = (np.arange(high - low + 1) / (high - low)).astype(np.float32)
    return StoredPixels(values, low, table)


@pytest.mark.skipif(not CUDA, reason="the GPU path needs CUDA; its CPU twin runs everywhere")
def test_on_cuda_the_inputs_equal_the_cpus(mammograms: list[Path]) -> None:
    """One pinned buffer of stored values (8- and 16-bit, signed and not) to the GPU, looked
    up and resized there: the same inputs, statistics and previews as on the CPU."""
    preprocess = Preprocess(256, 208)
    images: list[tuple[StoredPixels | np.ndarray, InputGeometry]] = []
    for path in mammograms:
        stored = read_pixels(path.read_bytes(), MediaType.DICOM)
        images.append((stored, preprocess.place(stored, Laterality.RIGHT)))
    film = images[2][0]
    assert isinstance(film, StoredPixels)
    eight_bit = _stored(((film.grey() * 255).round()).astype(np.uint8)[:-1, :-3])  # odd size
    signed = _stored((film.grey() * 4000 - 2000).round().astype(np.int16))
    grey = film.grey()
    for image in (eight_bit, signed, grey):
        images.append((image, preprocess.place(image, None)))
    kwargs = {"statistics": True, "preview_shrink": 4}
    on_cpu = preprocess.make_inputs(images, torch.device("cpu"), **kwargs)  # type: ignore[arg-type]
    on_gpu = preprocess.make_inputs(images, torch.device("cuda"), **kwargs)  # type: ignore[arg-type]
    assert on_gpu.inputs.device.type == "cuda"
    assert torch.allclose(on_gpu.inputs.cpu(), on_cpu.inputs, atol=1e-4)
    assert on_cpu.statistics is not None
    assert on_gpu.statistics is not None
    assert np.allclose(on_gpu.statistics, on_cpu.statistics, atol=1e-4)
    for gpu_preview, cpu_preview in zip(on_gpu.previews, on_cpu.previews, strict=True):
        assert np.abs(gpu_preview.astype(int) - cpu_preview).max() <= 1
