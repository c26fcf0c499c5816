from __future__ import annotations

import numpy as np
import pytest

from shared.db.models import Laterality
from shared.imaging.formats import ImageRejected
from shared.imaging.preprocess import (
    BreastCrop,
    Preprocess,
    ResizePad,
    Standardize,
)


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
    out = ResizePad(100, 100)(np.ones((50, 25), dtype=np.float32))
    assert out.shape == (100, 100)
    assert out[:, :50].min() == pytest.approx(1.0)
    assert out[:, 51:].max() == 0.0


def test_standardize_gives_zero_mean_unit_variance() -> None:
    out = Standardize()(np.random.default_rng(0).random((64, 64)).astype(np.float32))
    assert abs(float(out.mean())) < 1e-5
    assert float(out.std()) == pytest.approx(1.0, abs=1e-3)


def test_full_chain_output_shape_and_dtype() -> None:
    out = Preprocess(128, 104)(_breast(0.1), Laterality.LEFT)
    assert out.shape == (128, 104)
    assert out.dtype == np.float32
