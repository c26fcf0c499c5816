"""The realistic anatomy of the generator, against published statistics of real mammograms:
the tissue's power-law exponent, the BI-RADS density classes and their population mix, and
what a reader sees (skin line, nipple, a curved pectoral edge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from devstack.synth import (
    DENSITY_CLASSES,
    SynthOptions,
    _breast_geometry,
    _realistic_anatomy,
    draw_density,
    generate_exams,
)

OPTIONS = SynthOptions(height=512, width=416, pixel_spacing_mm=0.4, anatomy="realistic")
SHAPE = (OPTIONS.height, OPTIONS.width)


def _breast(view: str, seed: int, density: tuple[str, float]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    _, _, geometry = _breast_geometry(view, SHAPE, rng)
    return _realistic_anatomy(view, SHAPE, geometry, rng, OPTIONS, density, 0.03)


def _beta(image: np.ndarray) -> float:
    """The power-law exponent of a central region's spectrum (Hann window, mid frequencies)."""
    h, _ = image.shape
    roi = image[h // 2 - 48 : h // 2 + 48, 20:116]
    roi = roi - roi.mean()
    window = np.hanning(96)[:, None] * np.hanning(96)[None, :]
    power = np.abs(np.fft.fft2(roi * window)) ** 2
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96)))
    band = (freq > 0.03) & (freq < 0.25)
    return float(-np.polyfit(np.log(freq[band]), np.log(power[band]), 1)[0])


def test_tissue_keeps_the_power_law_of_real_mammograms() -> None:
    # Real mammograms' anatomic background: power spectrum 1/f^beta with beta about 3
    # (Burgess, Jacobson and Judy, Med Phys 2001, reported 2.8 on average).
    betas = [_beta(_breast("CC", seed, ("B", 0.4))[0]) for seed in range(6)]
    assert 2.5 <= float(np.mean(betas)) <= 3.5, betas


@pytest.mark.parametrize("name", list(DENSITY_CLASSES))
def test_each_density_class_fills_its_share_of_the_breast(name: str) -> None:
    low, high = DENSITY_CLASSES[name][1]
    for seed in range(3):
        image, breast, pectoral, thickness = _breast("CC", seed, (name, (low + high) / 2))
        inner = ndimage.binary_erosion(breast & ~pectoral, iterations=20)  # 8 mm in
        smooth = ndimage.gaussian_filter(image, 5)
        dense = (smooth - (0.30 + 0.06 * thickness)) > 0.075  # half the glandular contrast
        assert low - 0.08 <= dense[inner].mean() <= high + 0.08, (seed, dense[inner].mean())


def test_density_classes_come_in_the_published_mix() -> None:
    rng = np.random.default_rng(0)
    drawn = [draw_density(rng)[0] for _ in range(4000)]
    for name, (share, _) in DENSITY_CLASSES.items():
        assert abs(drawn.count(name) / len(drawn) - share) < 0.02
    fractions = [draw_density(rng) for _ in range(200)]
    assert all(DENSITY_CLASSES[n][1][0] <= f <= DENSITY_CLASSES[n][1][1] for n, f in fractions)


def test_a_reader_sees_a_skin_line_a_nipple_and_a_curved_pectoral_edge() -> None:
    pectoral = _breast("MLO", 3, ("A", 0.15))[2]
    # The pectoral edge: where the muscle ends on each row, a curve rather than a line.
    rows = [r for r in range(SHAPE[0]) if pectoral[r].any()]
    edge = np.array([np.flatnonzero(pectoral[r]).max() for r in rows], dtype=float)
    line = np.polyval(np.polyfit(rows, edge, 1), rows)
    assert np.abs(edge - line).max() > 8, "a straight pectoral edge"
    # The nipple: the breast's farthest point from the chest wall is a narrow protrusion.
    image_cc, breast_cc, _, _ = _breast("CC", 3, ("A", 0.15))
    reach = np.array([np.flatnonzero(row).max() if row.any() else 0 for row in breast_cc])
    tip = int(np.argmax(reach))
    assert reach[tip] - reach[max(0, tip - 15)] >= 4  # 6 mm off the tip, 1.6 mm shallower
    # The skin line is brighter than the fat just under it.
    profile = image_cc[tip, : reach[tip] + 1]
    assert profile[-2] > profile[-12]  # 0.8 mm vs 4.4 mm in from the skin


def test_realistic_exams_carry_their_density_and_the_default_is_unchanged(tmp_path: Path) -> None:
    realistic = generate_exams(tmp_path / "r", exams=3, seed=2, options=OPTIONS)
    assert {i.density for i in realistic} <= set(DENSITY_CLASSES)
    per_exam = {(i.study, i.density) for i in realistic}
    assert len(per_exam) == 3  # one class per woman, both breasts
    plain = SynthOptions(height=512, width=416, pixel_spacing_mm=0.4)
    first = generate_exams(tmp_path / "a", exams=1, seed=2, options=plain)
    again = generate_exams(tmp_path / "b", exams=1, seed=2, options=plain)
    assert first[0].density == ""
    assert first[0].path.read_bytes() == again[0].path.read_bytes()
