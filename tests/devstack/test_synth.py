from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from devstack.synth import Finding, SynthOptions, _power_law_texture, generate_exams
from shared.db.models import Laterality
from shared.imaging.decode import decode_image
from shared.imaging.formats import MediaType
from shared.imaging.preprocess import Preprocess

SMALL = SynthOptions(
    height=512, width=416, pixel_spacing_mm=0.4, malignant_prevalence=0.5, benign_prevalence=0.5
)


@pytest.fixture(scope="module")
def exams(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_exams(out, exams=6, seed=3, options=SMALL)
    return out


def test_four_mammography_views_per_exam_with_their_tags(exams: Path) -> None:
    files = sorted(exams.glob("*.dcm"))
    assert len(files) == 24
    views = set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MG"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert 12 <= ds.BitsStored <= 16
        assert ds.pixel_array.dtype == np.uint16
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        views.add((ds.PatientID, ds.ImageLaterality, ds.ViewPosition))
        assert ds.StudyInstanceUID
    assert len(views) == 24  # every exam has L-CC, L-MLO, R-CC and R-MLO exactly once


def test_labels_csv_has_a_row_per_image_and_boxes_in_both_views(exams: Path) -> None:
    with open(exams / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24
    assert {r["file"] for r in rows} == {p.name for p in exams.glob("*.dcm")}
    lesion_rows = [r for r in rows if r["label"] != Finding.NORMAL]
    assert lesion_rows, "prevalence 1.0 must place lesions"
    by_breast: dict[tuple[str, str], set[str]] = {}
    for row in lesion_rows:
        assert row["box_x0"]
        assert int(row["box_x1"]) > int(row["box_x0"])
        by_breast.setdefault((row["study"], row["laterality"]), set()).add(row["view"])
    assert all(v == {"CC", "MLO"} for v in by_breast.values())


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path: Path) -> None:
    a = generate_exams(tmp_path / "a", exams=1, seed=9, options=SMALL)
    b = generate_exams(tmp_path / "b", exams=1, seed=9, options=SMALL)
    c = generate_exams(tmp_path / "c", exams=1, seed=10, options=SMALL)
    assert a[0].path.read_bytes() == b[0].path.read_bytes()
    assert pydicom.dcmread(a[0].path).PixelData != pydicom.dcmread(c[0].path).PixelData


def test_texture_spectrum_follows_the_power_law() -> None:
    field = _power_law_texture(np.random.default_rng(0), (256, 256), beta=3.0)
    power = np.abs(np.fft.fft2(field)) ** 2
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256)))
    band = (freq > 0.02) & (freq < 0.3)
    slope = np.polyfit(np.log(freq[band]), np.log(power[band]), 1)[0]
    assert -3.3 < slope < -2.7


def test_mlo_shows_a_bright_pectoral_corner_and_cc_does_not(exams: Path) -> None:
    def corner_vs_centre(path: Path) -> float:
        px = pydicom.dcmread(path).pixel_array.astype(float)
        if pydicom.dcmread(path).ImageLaterality == "R":
            px = px[:, ::-1]
        h, w = px.shape
        return px[: h // 10, : w // 10].mean() / px[h // 2 - 20 : h // 2 + 20, :40].mean()

    assert corner_vs_centre(next(exams.glob("*_L_MLO.dcm"))) > 1.1
    assert corner_vs_centre(next(exams.glob("*_L_CC.dcm"))) < 0.5  # air above the breast


def test_right_breast_chest_wall_is_on_the_right(exams: Path) -> None:
    px = pydicom.dcmread(next(exams.glob("*_R_CC.dcm"))).pixel_array.astype(float)
    assert px[:, -20:].mean() > 3 * px[:, :20].mean()


def test_variants_cycle_per_exam_and_are_recorded_in_the_labels(tmp_path: Path) -> None:
    from devstack.synth import DEMO_VARIANTS, variant_mix

    images = generate_exams(tmp_path, exams=4, seed=2, options=SMALL, variants=DEMO_VARIANTS)
    by_exam: dict[str, set[str]] = {}
    for image in images:
        by_exam.setdefault(image.study, set()).add(image.encoding)
    assert [len(e) for e in by_exam.values()] == [1, 1, 1, 1]  # one encoding per exam
    assert {next(iter(e)) for e in by_exam.values()} == {v.name for v in DEMO_VARIANTS}
    photometrics = {pydicom.dcmread(i.path).PhotometricInterpretation for i in images}
    syntaxes = {pydicom.dcmread(i.path).file_meta.TransferSyntaxUID.keyword for i in images}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert "JPEG2000Lossless" in syntaxes
    with open(tmp_path / "labels.csv") as handle:
        assert {r["encoding"] for r in csv.DictReader(handle)} == set().union(*by_exam.values())
    everything = variant_mix("all")
    assert len({v.transfer_syntax for v in everything}) == 12
    assert {v.monochrome1 for v in everything} == {True, False}


@pytest.mark.parametrize(("style", "bits"), [("film", 8), ("vendor", 12), ("digital", 14)])
def test_each_style_is_its_own_domain_and_orients_like_its_source(
    tmp_path: Path, style: str, bits: int
) -> None:
    options = SynthOptions(height=512, width=416, pixel_spacing_mm=0.4, style=style, views=("MLO",))
    images = generate_exams(tmp_path, exams=2, seed=8, options=options)
    assert len(images) == 4  # MLO views only: two images per woman
    assert {i.view for i in images} == {"MLO"}
    for image in images:
        ds = pydicom.dcmread(image.path)
        assert ds.BitsStored == bits
        pixels = decode_image(image.path.read_bytes(), MediaType.DICOM)
        half = pixels.shape[1] // 2
        chest_wall_left = bool(pixels[:, :half].mean() > pixels[:, half:].mean())
        # Digital detectors put a right breast's chest wall on the right; film scans put
        # every chest wall on the left, and the header says so.
        expected_left = image.laterality == "L" or style == "film"
        assert chest_wall_left is expected_left
        assert (ds.PatientOrientation[0] == "A") is expected_left
        # Preprocessing brings every one to the chest wall on the left, from the pixels.
        laterality = Laterality.LEFT if image.laterality == "L" else Laterality.RIGHT
        inputs = Preprocess(128, 104)(pixels, laterality)
        assert inputs[:, :8].mean() > inputs[:, -8:].mean()
