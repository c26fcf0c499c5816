from __future__ import annotations

import numpy as np
import pytest

from shared.db.models import Laterality
from shared.imaging.formats import ImageRejected
from shared.imaging.preprocess import (
    BreastCrop,
    CanonicalOrientation,
    Preprocess,
    ResizePad,
    Standardize,
)


def _breast(background: float = 0.0) -> np.ndarray:
    img = np.full((200, 160), background, dtype=np.float32)
    img[40:160, 0:90] = 0.6  # breast against the left edge
    return img


def test_right_breasts_are_flipped_left_breasts_are_not() -> None:
    img = _breast()[:, ::-1].copy()
    flipped = CanonicalOrientation()(img, Laterality.RIGHT)
    assert flipped[100, :10].mean() == pytest.approx(0.6)
    assert CanonicalOrientation()(img, Laterality.LEFT) is img


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
