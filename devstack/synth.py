"""Synthetic screening mammograms: the project's own demo and test data.

Each exam has four views (L-CC, L-MLO, R-CC, R-MLO; `SynthOptions.views` can keep only the
MLOs) written as DICOM (Modality MG, 14 bits stored in 16), plus one `labels.csv` row per
image. `SynthOptions.style` makes the same anatomy look like another domain (`Style`): a
scanned screen-film mammogram or a vendor-processed digital view.

Physical scale (default pixel spacing 0.2 mm, 1024 x 832 pixels, about 205 x 166 mm):
- breast tissue: 1/f^beta texture with beta about 3, the power law measured on real
  mammograms, over a thickness fall-off towards the skin line;
- masses: 5-30 mm across, peak contrast 0.08-0.15 of the detector range over the tissue
  around them (the tissue texture itself spans about +-0.1). Malignant ones are irregular,
  ill-defined and spiculated (10-20 strands 0.4-1.5 mm wide running 1.4-2.5 radii out),
  benign ones round or oval and circumscribed. Both are drawn from the same size and contrast
  ranges, and spicules never brighten the body, so a malignant mass peaks exactly as bright as
  a benign one: brightness alone does not separate them; shape does;
- calcifications: malignant ones clustered (5-20 fine specks, 0.1-0.5 mm, within 5-10 mm),
  benign ones scattered and coarse (3-8 specks, 0.5-1 mm, over 20-40 mm), with the same
  contrast draw.

Default prevalence: 25% of exams malignant, 50% benign, 25% normal. An enriched set (as
reader studies use), and one where most exams a model must not recall have a lesion in them:
even a perfect lesion detector that cannot tell malignant from benign scores an exam AUC of
about 0.67 here. The non-learned baseline (shared/ml/baseline.py) scores about 0.5
(bench/model.json), while it separates views with a lesion from normal ones (tests/shared/
imaging/test_synth_difficulty.py).
A lesion sits at the same depth from the nipple in both views of its breast (the MLO's
vertical position is correlated with, not equal to, the CC's), as a reader would expect.

How each exam is *encoded* is a `DicomVariant`: transfer syntax (every one the decoder
supports, compressed ones included), MONOCHROME1, a non-zero background, a burnt-in label,
and the VOI LUT function. `generate_exams(variants=...)` cycles through them exam by exam,
so one call produces the mix of vendor quirks the decoder and preprocessing must survive.
"""

from __future__ import annotations

import csv
import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

# Digital Mammography X-Ray Image Storage - For Presentation.
MAMMO_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
BITS_STORED = 14
MAX_VALUE = (1 << BITS_STORED) - 1
LABEL_FIELDS = [
    "file",
    "patient",
    "study",
    "laterality",
    "view",
    "label",
    "lesion_type",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "encoding",
    "density",
]


class Finding(enum.StrEnum):
    NORMAL = "normal"
    BENIGN = "benign"
    MALIGNANT = "malignant"


@dataclass(frozen=True)
class SynthOptions:
    height: int = 1024
    width: int = 832
    pixel_spacing_mm: float = 0.2
    malignant_prevalence: float = 0.25  # share of exams with a malignant lesion
    # Share of exams with a benign lesion (and no malignant). Twice the normal share: most
    # exams a screening model must not recall have something bright in them, so finding a
    # bright spot is not enough (see shared/ml/baseline.py).
    benign_prevalence: float = 0.5
    texture_beta: float = 3.0
    texture_amplitude: float = 0.06
    # Peak lesion contrast over the surrounding tissue, in units of the detector range;
    # the same range for malignant and benign findings.
    lesion_contrast: tuple[float, float] = (0.08, 0.15)
    # How the images look once acquired (see Style): today's digital detector, a scanned
    # screen-film mammogram, or a vendor-processed digital view.
    style: str = "digital"
    # The views of each breast: ("MLO",) makes film-archive style two-image exams.
    views: tuple[str, ...] = ("CC", "MLO")
    # "ellipse": the textured ellipse (and straight pectoral edge) the shipped model was
    # trained on; "realistic": `_realistic_anatomy`, closer to real mammograms.
    anatomy: str = "ellipse"


class Style(enum.StrEnum):
    """A domain: how a mammogram looks once acquired. A model trained on one meets the others
    at real sites, which is what the second and third are for (warm start, cross-validation,
    out-of-distribution warnings are developed and tested on them).

    - DIGITAL: a raw-ish digital detector, 14 bits stored, linear (the first domain).
    - FILM: a screen-film mammogram digitised by a film scanner: 8 bits, the film's S-shaped
      characteristic curve (contrast crushed in the dense and fatty extremes), screen blur,
      scanner noise with row banding, the unexposed film edge as a bright border, lead
      markers and a paper label burnt in, and the layout of the light box: every breast with
      its chest wall on the left, the right ones too (PatientOrientation says so).
    - VENDOR: a digital view after a vendor's "for presentation" processing: 12 bits in 16,
      thickness equalisation (the skin line brought up to the centre's level), strong
      unsharp masking and a logarithmic display curve.
    """

    DIGITAL = "digital"
    FILM = "film"
    VENDOR = "vendor"

    @property
    def bits_stored(self) -> int:
        return {Style.DIGITAL: BITS_STORED, Style.FILM: 8, Style.VENDOR: 12}[self]


def _film_scan(
    image: NDArray, breast: NDArray, rng: np.random.Generator, laterality_marker: str
) -> NDArray:
    # Film density follows log exposure through an S curve; the scan shows density as
    # brightness (dense tissue is bright, as on the light box).
    curve = 1.0 / (1.0 + np.exp(-9.0 * (image - 0.42)))
    curve = (curve - curve.min()) / max(1e-6, float(np.ptp(curve)))
    blurred = ndimage.gaussian_filter(curve, sigma=1.6)  # intensifying screen unsharpness
    h, w = blurred.shape
    banding = rng.normal(0, 0.012, size=(h, 1)) * np.ones((1, w))  # scanner rows
    scanned = 0.06 + 0.86 * blurred + banding + rng.normal(0, 0.02, (h, w))
    edge = max(3, h // 60)  # unexposed film under the cassette frame: bright
    scanned[:edge, :] = scanned[-edge:, :] = 0.93
    scanned[:, -edge:] = 0.93
    _burn_in_label(scanned)  # the lead marker
    label_top, label_left = h - h // 7, w - w // 3  # the paper identification label
    scanned[label_top : label_top + h // 14, label_left : label_left + w // 4] = 0.97
    del breast, laterality_marker
    result: NDArray = np.clip(scanned, 0, 1)
    return result


def _vendor_processing(image: NDArray, breast: NDArray, thickness: NDArray) -> NDArray:
    # Thickness equalisation: lift the periphery, where the compressed breast thins out.
    equalised = image + 0.22 * (1.0 - thickness) * breast
    detail = equalised - ndimage.gaussian_filter(equalised, sigma=12)
    sharpened = equalised + 1.4 * detail  # unsharp masking
    display = np.log1p(6.0 * np.clip(sharpened, 0, None)) / np.log1p(6.0)
    result: NDArray = np.clip(np.where(breast, display, 0.02), 0, 1)
    return result


# Every transfer syntax the generator can write; the decoder is tested against each.
UNCOMPRESSED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
COMPRESSED_SYNTAXES = (
    RLELossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
LOSSY_SYNTAXES = (JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)


@dataclass(frozen=True)
class DicomVariant:
    """How one exam is encoded: the quirks real vendors' files have."""

    transfer_syntax: str = ExplicitVRLittleEndian
    monochrome1: bool = False  # high stored values are dark (Fujifilm, some Planmed)
    background: float = 0.03  # grey level outside the breast, 0..1 of the detector range
    burnt_in_label: bool = False  # a bright "R MLO"-style marker block beside the breast
    voi_lut_function: str = "LINEAR"  # or "SIGMOID"

    @property
    def name(self) -> str:
        parts = [UID(self.transfer_syntax).keyword or self.transfer_syntax]
        if self.monochrome1:
            parts.append("MONOCHROME1")
        if self.background > 0.1:
            parts.append("background")
        if self.burnt_in_label:
            parts.append("label")
        if self.voi_lut_function != "LINEAR":
            parts.append(self.voi_lut_function)
        return "+".join(parts)


# The mix `make demo` and the end-to-end tests use: plain, MONOCHROME1, JPEG 2000, and
# a vendor-style file with a grey background and a burnt-in label.
DEMO_VARIANTS = (
    DicomVariant(),
    DicomVariant(monochrome1=True),
    DicomVariant(transfer_syntax=JPEG2000Lossless),
    DicomVariant(background=0.18, burnt_in_label=True, voi_lut_function="SIGMOID"),
)


def variant_mix(name: str) -> tuple[DicomVariant, ...]:
    """Named mixes for the CLI: "plain", "demo" or "all" (every syntax, both photometrics)."""
    if name == "plain":
        return (DicomVariant(),)
    if name == "demo":
        return DEMO_VARIANTS
    if name == "all":
        return tuple(
            DicomVariant(transfer_syntax=syntax, monochrome1=mono1)
            for syntax in UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES
            for mono1 in (False, True)
        )
    raise ValueError(f"unknown encoding mix {name!r}: plain, demo or all")


@dataclass(frozen=True)
class Lesion:
    finding: Finding
    kind: str  # "mass" or "calcifications"
    depth: float  # 0 at the nipple, 1 at the chest wall
    offset: float  # -1..1 across the breast
    size_mm: float
    contrast: float
    seed: int


@dataclass(frozen=True)
class SynthImage:
    path: Path
    patient: str
    study: str
    laterality: str
    view: str
    label: Finding
    lesion_type: str
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in pixels of the written image
    encoding: str = DicomVariant().name
    density: str = ""  # BI-RADS class A-D (realistic anatomy only)


def _power_law_texture(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> NDArray:
    """Gaussian noise with power spectrum 1/f^beta, scaled to zero mean and unit variance."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    amplitude = freq ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (
        rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)
    )
    field: NDArray = np.fft.irfft2(spectrum, s=shape)
    normalised: NDArray = (field - field.mean()) / (field.std() + 1e-12)
    return normalised


def _breast_geometry(
    view: str, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[NDArray, NDArray, tuple[float, float, float, float]]:
    """(breast mask, pectoral mask, ellipse centre row/col and semi-axes), chest wall at col 0."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    if view == "CC":
        centre_r, semi_r, semi_c = (
            h * rng.uniform(0.47, 0.53),
            h * rng.uniform(0.36, 0.44),
            w * rng.uniform(0.66, 0.8),
        )
    else:
        centre_r, semi_r, semi_c = (
            h * rng.uniform(0.52, 0.58),
            h * rng.uniform(0.42, 0.48),
            w * rng.uniform(0.62, 0.76),
        )
    ellipse = ((rows - centre_r) / semi_r) ** 2 + (cols / semi_c) ** 2 <= 1.0
    pectoral = np.zeros(shape, dtype=bool)
    if view == "MLO":
        # The MLO shows the pectoral muscle as a bright triangle in the upper chest-wall corner.
        top_width, bottom_row = w * rng.uniform(0.28, 0.4), h * rng.uniform(0.38, 0.5)
        pectoral = cols < top_width * (1.0 - rows / bottom_row)
    return ellipse | pectoral, pectoral, (centre_r, 0.0, semi_r, semi_c)


def _lesion_centre(
    lesion: Lesion,
    view: str,
    geometry: tuple[float, float, float, float],
    rng_view: np.random.Generator,
) -> tuple[float, float]:
    centre_r, _, semi_r, semi_c = geometry
    col = (1.0 - lesion.depth) * semi_c * 0.85
    # Same depth in both views; the MLO's vertical position follows the CC's with some scatter.
    spread = semi_r * 0.55 * np.sqrt(max(0.0, 1.0 - (col / semi_c) ** 2))
    offset = (
        lesion.offset
        if view == "CC"
        else np.clip(lesion.offset * 0.7 + rng_view.normal(0, 0.15), -1, 1)
    )
    return centre_r + offset * spread, col


def _draw_lesion(
    canvas: NDArray, lesion: Lesion, centre: tuple[float, float], spacing_mm: float
) -> tuple[int, int, int, int]:
    """Adds the lesion to `canvas` in place; returns its bounding box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(lesion.seed)
    h, w = canvas.shape
    cr, cc = centre
    radius = lesion.size_mm / spacing_mm / 2.0
    reach = radius * (2.6 if lesion.kind == "mass" and lesion.finding == Finding.MALIGNANT else 1.3)
    if lesion.kind == "calcifications":
        reach = radius
    r0, r1 = int(max(0, cr - reach - 4)), int(min(h, cr + reach + 5))
    c0, c1 = int(max(0, cc - reach - 4)), int(min(w, cc + reach + 5))
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    dr, dc = rows - cr, cols - cc
    patch = np.zeros(rows.shape)
    if lesion.kind == "mass":
        angle = np.arctan2(dr, dc)
        dist = np.hypot(dr, dc)
        if lesion.finding == Finding.MALIGNANT:
            # Irregular (lobulated), ill-defined margin plus radiating spicules.
            wobble = (
                1.0
                + 0.22 * np.sin(angle * rng.integers(3, 7) + rng.uniform(0, 6.28))
                + 0.1 * np.sin(angle * rng.integers(7, 12) + rng.uniform(0, 6.28))
            )
            body = 1.0 / (1.0 + np.exp((dist - radius * wobble) / (radius * 0.12)))
            strands = np.zeros(rows.shape)
            for theta in rng.uniform(0, 2 * np.pi, rng.integers(10, 20)):
                length = radius * rng.uniform(1.4, 2.5)
                along = dc * np.cos(theta) + dr * np.sin(theta)
                across = -dc * np.sin(theta) + dr * np.cos(theta)
                # Strands about 0.4-1.5 mm across, as spicules are on screening films.
                width = max(0.4 / spacing_mm, radius * 0.08)
                strand = np.exp(-((across / width) ** 2)) * ((along > 0) & (along < length))
                strands += 0.85 * strand * (1.0 - np.clip(along / length, 0, 1))
            # Spicules run out of the body and never brighten it: the peak contrast stays the
            # lesion's contrast, exactly as for a benign mass.
            patch = np.maximum(body, np.clip(strands, 0, 0.85))
        else:
            # Round or oval, sharp (circumscribed) margin.
            aspect = rng.uniform(0.75, 1.0)
            ell = np.hypot(dc, dr / aspect)
            patch = 1.0 / (1.0 + np.exp((ell - radius) / max(0.6, radius * 0.03)))
        patch = patch * lesion.contrast
    else:
        if lesion.finding == Finding.MALIGNANT:
            count, size_range, spread = rng.integers(5, 21), (0.1, 0.5), radius
        else:
            count, size_range, spread = rng.integers(3, 9), (0.5, 1.0), radius
        for _ in range(count):
            pr, pc = cr + rng.normal(0, spread / 2.2), cc + rng.normal(0, spread / 2.2)
            speck = rng.uniform(*size_range) / spacing_mm / 2.0
            patch += np.exp(-((rows - pr) ** 2 + (cols - pc) ** 2) / (2 * max(0.5, speck) ** 2))
        patch = np.clip(patch, 0, 1) * (lesion.contrast * 2.5)
    canvas[r0:r1, c0:c1] += patch
    return c0, r0, c1, r1


# BI-RADS (5th edition) breast density classes: their shares among women screened in the US
# (Sprague et al., J Natl Cancer Inst 2014: 10%, 43%, 39%, 8%) and the fibroglandular share
# of the breast each stands for.
DENSITY_CLASSES: dict[str, tuple[float, tuple[float, float]]] = {
    "A": (0.10, (0.05, 0.25)),  # almost entirely fatty
    "B": (0.43, (0.25, 0.50)),  # scattered fibroglandular densities
    "C": (0.39, (0.50, 0.75)),  # heterogeneously dense
    "D": (0.08, (0.75, 0.92)),  # extremely dense
}


def draw_density(rng: np.random.Generator) -> tuple[str, float]:
    """A woman's density class, by the published shares, and her fibroglandular fraction."""
    names = list(DENSITY_CLASSES)
    name = names[int(rng.choice(len(names), p=[DENSITY_CLASSES[n][0] for n in names]))]
    low, high = DENSITY_CLASSES[name][1]
    return name, float(rng.uniform(low, high))


def _curve(
    rng: np.random.Generator, start: tuple[float, float], heading: float, steps: int, step: float
) -> NDArray:
    """Points of a smooth random walk (a vessel or a ligament): heading changes slowly."""
    points = [start]
    turn = 0.0
    for _ in range(steps):
        turn = 0.85 * turn + rng.normal(0, 0.06)
        heading += turn
        r, c = points[-1]
        points.append((r + step * np.sin(heading), c + step * np.cos(heading)))
    return np.array(points)


def _draw_curves(canvas: NDArray, curves: list[NDArray], width: float, contrast: float) -> None:
    """Thin bright lines along `curves` (rows, cols), Gaussian across, added in place."""
    lines = np.zeros_like(canvas)
    h, w = canvas.shape
    for curve in curves:
        for r, c in curve:
            ri, ci = round(float(r)), round(float(c))
            if 0 <= ri < h and 0 <= ci < w:
                lines[ri, ci] = 1.0
    canvas += contrast * np.clip(ndimage.gaussian_filter(lines, width) * width * 4.0, 0, 1)


def _realistic_anatomy(
    view: str,
    shape: tuple[int, int],
    geometry: tuple[float, float, float, float],
    rng: np.random.Generator,
    options: SynthOptions,
    density: tuple[str, float],
    background: float,
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """(image, breast mask, pectoral mask, thickness) of a breast closer to a real one than
    a textured ellipse: an irregular contour with a nipple in profile, a skin line over a
    subcutaneous fat layer, fibroglandular tissue filling the woman's density class's share
    of the breast (clumped, densest behind the nipple), vessels running from the chest wall,
    Cooper's ligaments under the skin, and in MLO views a curved pectoral muscle edge. The
    tissue texture keeps the power law of real mammograms (1/f^beta, beta about 3)."""
    h, w = shape
    centre_r, _, semi_r, semi_c = geometry
    mm = 1.0 / options.pixel_spacing_mm
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    dr, dc = (rows - centre_r) / semi_r, cols / semi_c
    angle, rho = np.arctan2(dr, dc), np.hypot(dr, dc)
    boundary = np.ones(shape)
    for k in (2, 3, 4, 5):
        boundary += rng.uniform(0, 0.035) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    nipple_angle = rng.normal(0, 0.08)
    boundary += (4 * mm / semi_c) * np.exp(-(((angle - nipple_angle) / (5 * mm / semi_r)) ** 2))
    breast = rho <= boundary
    depth_mm = (boundary - rho) * min(semi_r, semi_c) / mm  # about the distance to the skin
    thickness = np.clip(1.0 - (rho / boundary) ** 4, 0, 1)
    pectoral = np.zeros(shape, dtype=bool)
    if view == "MLO":
        top_width, bottom_row = w * rng.uniform(0.28, 0.4), h * rng.uniform(0.38, 0.5)
        bulge = rng.uniform(1.4, 2.2)  # > 1: the edge bows towards the nipple
        pectoral = cols < top_width * (1.0 - np.clip(rows / bottom_row, 0, 1) ** bulge)
    _, fraction = density
    # Fibroglandular tissue: a smooth field, weighted to the retroareolar cone, cut at the
    # quantile that fills `fraction` of the breast away from the skin.
    field = _power_law_texture(rng, shape, 3.5)
    field = field + 1.2 * np.exp(-(dr**2) / 0.35) * (1.0 - 0.5 * dc) - 0.8 * (depth_mm < 12)
    inner = breast & ~pectoral & (depth_mm > 3)
    cut = np.quantile(field[inner], 1.0 - fraction) if inner.any() else np.inf
    # A soft edge: fibroglandular tissue thins out into fat rather than stopping at a line.
    glandular = ndimage.gaussian_filter(1.0 / (1.0 + np.exp(-(field - cut) / 0.3)), 1.0 * mm)
    texture = _power_law_texture(rng, shape, options.texture_beta)
    tissue = (
        0.30
        + 0.06 * thickness
        + 0.15 * glandular
        + options.texture_amplitude * texture * thickness * (0.6 + 0.8 * glandular)
    )
    tissue += 0.05 * (depth_mm < 1.8)  # skin
    tissue -= 0.02 * ((depth_mm >= 1.8) & (depth_mm < 6))  # subcutaneous fat
    image = np.where(breast, tissue, background)
    vessels = [
        _curve(
            rng,
            (centre_r + rng.normal(0, 0.35) * semi_r, 0.0),
            rng.normal(0, 0.25),
            int(semi_c * 0.8 / (2 * mm)),
            2 * mm,
        )
        for _ in range(int(rng.integers(2, 5)))
    ]
    _draw_curves(image, vessels, 0.5 * mm, 0.035)
    ligaments = []
    for _ in range(int(rng.integers(6, 12))):
        theta = rng.uniform(-1.2, 1.2)
        r = centre_r + np.sin(theta) * semi_r * 0.88
        c = np.cos(theta) * semi_c * 0.88
        ligaments.append(_curve(rng, (r, c), theta + rng.normal(0, 0.4), int(8 * mm / 2), 2.0))
    _draw_curves(image, ligaments, 0.3 * mm, 0.025)
    image = np.where(breast | pectoral, image, background)
    texture_pectoral = 0.62 + 0.05 * texture
    image = np.where(pectoral, texture_pectoral, image)
    return image, breast | pectoral, pectoral, thickness


def _render_view(
    view: str,
    lesion: Lesion | None,
    options: SynthOptions,
    rng: np.random.Generator,
    variant: DicomVariant,
    density: tuple[str, float] = ("", 0.0),
) -> tuple[NDArray, tuple[int, int, int, int] | None]:
    shape = (options.height, options.width)
    breast, pectoral, geometry = _breast_geometry(view, shape, rng)
    centre_r, _, semi_r, semi_c = geometry
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    if options.anatomy == "realistic":
        image, breast, pectoral, thickness = _realistic_anatomy(
            view, shape, geometry, rng, options, density, variant.background
        )
    else:
        # Compressed thickness falls off towards the skin line; density follows it.
        radial = np.sqrt(((rows - centre_r) / semi_r) ** 2 + (cols / semi_c) ** 2)
        thickness = np.clip(1.0 - radial**4, 0, 1)
        texture = _power_law_texture(rng, shape, options.texture_beta)
        density_map = 0.32 + 0.16 * thickness + options.texture_amplitude * texture * thickness
        image = np.where(breast, density_map, variant.background)
        image = np.where(pectoral, 0.62 + 0.05 * texture, image)
    if variant.burnt_in_label:
        _burn_in_label(image)
    box = None
    if lesion is not None:
        centre = _lesion_centre(lesion, view, geometry, rng)
        box = _draw_lesion(image, lesion, centre, options.pixel_spacing_mm)
    image = np.clip(image + rng.normal(0, 0.004, shape), 0, 1)  # quantum noise
    style = Style(options.style)
    if style == Style.FILM:
        image = _film_scan(image, breast, rng, view)
    elif style == Style.VENDOR:
        image = _vendor_processing(image, breast, thickness)
    return image, box


def _burn_in_label(image: NDArray) -> None:
    """A saturated marker block ("R MLO" and the like) in the corner away from the chest wall.

    Drawn at the chest-wall-free edge, as vendors do; it is smaller than the breast and
    separate from it, so a crop that takes the largest bright region ignores it.
    """
    h, w = image.shape
    bh, bw = max(6, h // 24), max(12, w // 8)
    top = h // 25
    left = w - bw - max(2, w // 40)
    image[top : top + bh, left : left + bw] = 1.0
    # "Letters": darker strokes inside the block, so it is not a uniform rectangle.
    for stroke in range(3):
        col = left + (stroke + 1) * bw // 4
        image[top + 2 : top + bh - 2, col : col + max(1, bw // 20)] = 0.6


def _draw_lesion_spec(rng: np.random.Generator, finding: Finding, options: SynthOptions) -> Lesion:
    kind = "mass" if rng.random() < 0.7 else "calcifications"
    size = (
        rng.uniform(5, 30)
        if kind == "mass"
        else rng.uniform(5, 10)
        if finding == Finding.MALIGNANT
        else rng.uniform(20, 40)
    )
    return Lesion(
        finding=finding,
        kind=kind,
        depth=rng.uniform(0.2, 0.75),
        offset=rng.uniform(-0.8, 0.8),
        size_mm=size,
        contrast=rng.uniform(*options.lesion_contrast),
        seed=int(rng.integers(0, 2**31)),
    )


def _write_dicom(
    path: Path,
    pixels: NDArray,
    *,
    patient: str,
    study_uid: str,
    series_uid: str,
    laterality: str,
    view: str,
    options: SynthOptions,
    seed_parts: list[str],
    variant: DicomVariant,
) -> None:
    bits_stored = Style(options.style).bits_stored
    stored = np.round(pixels * ((1 << bits_stored) - 1)).astype(np.uint16)
    sop_uid = generate_uid(entropy_srcs=[*seed_parts, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(variant.transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientID = patient
    ds.PatientName = f"SYNTHETIC^{patient}"
    ds.PatientBirthDate = "19650101"
    ds.PatientSex = "F"
    ds.StudyDate = "20261102"
    ds.StudyTime = "093000"
    ds.StudyID = f"S{seed_parts[1]}"
    ds.InstitutionName = "Synthetic Screening Centre"
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.AccessionNumber = f"ACC{seed_parts[1]}"
    ds.StudyDescription = "Synthetic screening mammogram (mammoscreen generator)"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view
    # Which way rows and columns run in the patient (PS3.3 C.7.6.1.1.1), as mammography
    # modalities write it: the chest wall on the left for a left breast, on the right for a
    # right one.
    orientation = PATIENT_ORIENTATIONS[(laterality, view)]
    if laterality == "R" and options.style == Style.FILM:
        orientation = ["A", orientation[1]]  # mirrored: the nipple towards the image's right
    ds.PatientOrientation = orientation
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [options.pixel_spacing_mm, options.pixel_spacing_mm]
    ds.ImagerPixelSpacing = [options.pixel_spacing_mm, options.pixel_spacing_mm]
    ds.BurnedInAnnotation = "YES" if variant.burnt_in_label else "NO"
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.VOILUTFunction = variant.voi_lut_function
    if options.style == Style.FILM:
        ds.Manufacturer = "Synthetic Film Digitizer"
        ds.ConversionType = "DF"  # digitised film
    elif options.style == Style.VENDOR:
        ds.Manufacturer = "Synthetic Vendor"
    _encode_pixels(ds, stored, variant, bits_stored)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


PATIENT_ORIENTATIONS = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}


def _encode_pixels(
    ds: Dataset, stored: NDArray, variant: DicomVariant, bits_stored: int = BITS_STORED
) -> None:
    """Set the pixel module and Pixel Data for `variant`'s photometric and transfer syntax;
    `stored` holds `bits_stored`-bit values."""
    syntax = UID(variant.transfer_syntax)
    bits = min(bits_stored, {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}.get(syntax, bits_stored))
    values = stored >> (bits_stored - bits) if bits < bits_stored else stored
    top = (1 << bits) - 1
    if variant.monochrome1:
        values = top - values
    ds.PhotometricInterpretation = "MONOCHROME1" if variant.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.WindowCenter = top // 2
    ds.WindowWidth = top
    values = values.astype(np.uint8 if bits == 8 else np.uint16)
    if syntax in UNCOMPRESSED_SYNTAXES:
        if bits == 8:
            ds.PixelData = values.tobytes()
            ds["PixelData"].VR = "OB"
            return
        ds.PixelData = values.astype(">u2" if syntax == ExplicitVRBigEndian else "<u2").tobytes()
        return
    if syntax in LOSSY_SYNTAXES:
        ds.LossyImageCompression = "01"
    if syntax in (RLELossless, JPEG2000Lossless, JPEG2000):
        if syntax == JPEG2000:  # lossy: a high PSNR, as vendors' "visually lossless"
            ds.compress(syntax, values, encoding_plugin="pylibjpeg", j2k_psnr=[80.0])
        else:
            ds.compress(syntax, values, encoding_plugin="pylibjpeg")
        return
    ds.PixelData = encapsulate([_imagecodecs_frame(values, syntax, bits)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def _imagecodecs_frame(values: NDArray, syntax: UID, bits: int) -> bytes:
    """JPEG family frames pydicom cannot encode itself (libjpeg-turbo and CharLS)."""
    import imagecodecs

    if syntax == JPEGBaseline8Bit:
        return bytes(imagecodecs.jpeg8_encode(values, level=92))
    if syntax == JPEGExtended12Bit:
        return bytes(imagecodecs.jpeg8_encode(values, level=92, bitspersample=12))
    if syntax == JPEGLosslessSV1:
        return bytes(
            imagecodecs.jpeg8_encode(values, lossless=True, predictor=1, bitspersample=bits)
        )
    if syntax == JPEGLSLossless:
        return bytes(imagecodecs.jpegls_encode(values))
    if syntax == JPEGLSNearLossless:
        return bytes(imagecodecs.jpegls_encode(values, level=2))
    raise ValueError(f"the generator cannot encode {syntax}")


def generate_exams(
    out_dir: Path,
    *,
    exams: int,
    seed: int,
    options: SynthOptions | None = None,
    variants: tuple[DicomVariant, ...] = (DicomVariant(),),
    first_index: int = 0,
) -> list[SynthImage]:
    """Write `exams` four-view exams and `labels.csv` into `out_dir`; deterministic per seed.

    Exam i is encoded as `variants[i % len(variants)]`. Exams are numbered from
    `first_index`, and each depends only on (seed, its number), so a large set can be made in
    parallel chunks that together equal one call.
    """
    options = options or SynthOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[SynthImage] = []
    for index in range(first_index, first_index + exams):
        rng = np.random.default_rng([seed, index])
        patient = f"SYN{seed:04d}{index:05d}"
        study_uid = generate_uid(entropy_srcs=[str(seed), str(index), "study"])
        draw = rng.random()
        finding = (
            Finding.MALIGNANT
            if draw < options.malignant_prevalence
            else Finding.BENIGN
            if draw < options.malignant_prevalence + options.benign_prevalence
            else Finding.NORMAL
        )
        lesion_side = "L" if rng.random() < 0.5 else "R"
        lesion = _draw_lesion_spec(rng, finding, options) if finding != Finding.NORMAL else None
        # A woman's density (both breasts), drawn apart so the ellipse anatomy's images stay
        # exactly what they were.
        density = (
            draw_density(np.random.default_rng([seed, index, 17]))
            if options.anatomy == "realistic"
            else ("", 0.0)
        )
        variant = variants[index % len(variants)]
        for laterality in ("L", "R"):
            series_uid = generate_uid(entropy_srcs=[str(seed), str(index), laterality])
            for view in options.views:
                side_lesion = lesion if laterality == lesion_side else None
                pixels, box = _render_view(view, side_lesion, options, rng, variant, density)
                # Digital detectors image a right breast with its chest wall on the image's
                # right; a film on the light box is scanned with every chest wall on the left.
                if laterality == "R" and options.style != Style.FILM:
                    # Right breasts are imaged with the chest wall on the image's right.
                    pixels = pixels[:, ::-1]
                    if box is not None:
                        x0, y0, x1, y1 = box
                        box = (options.width - x1, y0, options.width - x0, y1)
                path = out_dir / f"exam{index:05d}_{laterality}_{view}.dcm"
                _write_dicom(
                    path,
                    pixels,
                    patient=patient,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    laterality=laterality,
                    view=view,
                    options=options,
                    seed_parts=[str(seed), str(index), laterality, view],
                    variant=variant,
                )
                label = side_lesion.finding if side_lesion else Finding.NORMAL
                written.append(
                    SynthImage(
                        path,
                        patient,
                        study_uid,
                        laterality,
                        view,
                        label,
                        side_lesion.kind if side_lesion else "",
                        box,
                        variant.name,
                        density[0],
                    )
                )
    write_labels(out_dir / "labels.csv", written)
    return written


def write_labels(path: Path, images: list[SynthImage]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_FIELDS)
        for image in images:
            box = image.box or ("", "", "", "")
            writer.writerow(
                [
                    image.path.name,
                    image.patient,
                    image.study,
                    image.laterality,
                    image.view,
                    image.label.value,
                    image.lesion_type,
                    *box,
                    image.encoding,
                    image.density,
                ]
            )
