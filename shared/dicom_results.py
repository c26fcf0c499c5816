"""A screened exam's results as DICOM objects, built with highdicom (worker side only).

- A Comprehensive SR holding a TID 1500 Measurement Report: the exam's score, its calibrated
  probability and the recall recommendation with the threshold that made it; each breast's
  score; each image's score; the algorithm (TID 4019) with the model version; references to
  every source image. A new series of the original study.
- Per image, a Segmentation (FRACTIONAL, PROBABILITY) of the heatmap, on the source image's
  own rows and columns: the worker's heatmap is already mapped back through the crop and the
  orientation, at 1/4 size, and is resized here to the full image.
- Optionally per image, a Secondary Capture of the image with the heatmap burnt in, for PACS
  that display neither.

The objects are built from the de-identified source headers, so what this module returns is
de-identified; `shared/reidentify.py` puts the original identifiers back when it is sent.
Every UID is derived from our ids with the server's secret, so rendering again (a retry, a
second destination) yields the same SOP Instance UIDs and a PACS never holds two reports of
one exam from one model version.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from shared.db.models import Laterality, PredictionWarning, View
from shared.exams import ExamAssessment
from shared.imaging.deid import Deidentifier
from shared.imaging.renders import burn_in

MANUFACTURER = "mammoscreen"
SOFTWARE = "mammoscreen"
# The standard's concepts where it has them (PS3.16: the mammography CAD and breast imaging
# report templates), so a PACS or reporting system that knows them understands the report.
PROBABILITY = CodedConcept.from_code(codes.DCM.ProbabilityOfCancer)
THRESHOLD = CodedConcept.from_code(codes.DCM.RecommendedCADOperatingPoint)
RECOMMENDATION = CodedConcept.from_code(codes.DCM.RecommendedFollowUp)
RECALL = CodedConcept.from_code(codes.DCM.RecallForImagingFindings)
ROUTINE = CodedConcept.from_code(codes.DCM.NormalIntervalFollowUp)
# The model's scores and the heatmap have none: our own concepts, in a private coding scheme
# (PS3.16 8.2: designators starting "99"), declared in the object.
SCHEME = "99MSCREEN"
SCHEME_NAME = "mammoscreen screening results"
EXAM_SCORE = CodedConcept("exam-score", SCHEME, "Exam malignancy score")
BREAST_SCORE = CodedConcept("breast-score", SCHEME, "Breast malignancy score")
IMAGE_SCORE = CodedConcept("image-score", SCHEME, "Image malignancy score")
HEATMAP = CodedConcept("heatmap", SCHEME, "Malignancy heatmap")
# An image whose statistics lie far from the model's training inputs (the API's
# input_unlike_training_data): its score may not mean what the model's evaluation says.
INPUT_UNLIKE_TRAINING = CodedConcept(
    "input-unlike-training-data", SCHEME, "Input unlike the model's training data"
)
YES = CodedConcept.from_code(codes.SCT.Yes)
UNITLESS = CodedConcept("1", "UCUM", "no units")
SCREENING_MAMMOGRAPHY = CodedConcept("24623002", "SCT", "Screening mammography")
BREAST_SITES = {
    Laterality.LEFT: CodedConcept("80248007", "SCT", "Left breast"),
    Laterality.RIGHT: CodedConcept("73056007", "SCT", "Right breast"),
}
BREAST = CodedConcept("76752008", "SCT", "Breast")
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

REPORT_SERIES_NUMBER = 9001
HEATMAP_SERIES_NUMBER = 9002
CAPTURE_SERIES_NUMBER = 9003


@dataclass(frozen=True)
class ImageResult:
    image_id: uuid.UUID
    header: Dataset  # the de-identified source header, pixels not needed
    laterality: Laterality
    view: View
    score: float
    # (H, W) per-position probability in [0, 1] at 1/4 size, in the image's own orientation.
    heatmap: np.ndarray | None = None
    # (rows, columns) display-ready pixels in [0, 1], only for a Secondary Capture.
    pixels: np.ndarray | None = None
    warnings: tuple[str, ...] = ()  # the prediction's, e.g. input_unlike_training_data


@dataclass(frozen=True)
class ExamResult:
    study_id: uuid.UUID
    model_version_id: uuid.UUID
    model_version_name: str
    images: Sequence[ImageResult]
    assessment: ExamAssessment


@dataclass(frozen=True)
class RenderedObject:
    kind: str  # "report", "heatmap" or "capture"
    image_id: uuid.UUID | None
    dataset: Dataset


# Type 2 attributes of the Patient and General Study modules: a de-identified header may lack
# them (the profile removes some), and every object we write must carry them, empty if so.
PATIENT_AND_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


# What the de-identification library writes for a date it empties; not a valid DA.
PROFILE_DUMMY_VALUES = ("00010101", "000000.00")


def as_source(header: Dataset) -> Dataset:
    """A copy of a source header with the Type 2 patient and study attributes present."""
    source = copy.deepcopy(header)
    for keyword in PATIENT_AND_STUDY_TYPE2:
        if keyword not in source or str(source.get(keyword)) in PROFILE_DUMMY_VALUES:
            setattr(source, keyword, "")
    return source


class UidSource:
    """Stable UIDs for our objects: the same ids always give the same UID."""

    def __init__(self, deidentifier: Deidentifier) -> None:
        self._deidentifier = deidentifier

    def __call__(self, *parts: object) -> str:
        return self._deidentifier.pseudonymous_uid(
            "mammoscreen-result:" + ":".join(map(str, parts))
        )


def _algorithm(
    exam: ExamResult, threshold: float | None, source: str | None
) -> AlgorithmIdentification:
    # The threshold, and whether it is the site's own operating point or the model's.
    parameters = (
        [f"recall_threshold={threshold:.6f}", f"threshold_source={source}"]
        if threshold is not None
        else None
    )
    return AlgorithmIdentification(
        name="mammoscreen screening model",
        family=ALGORITHM_FAMILY,
        version=exam.model_version_name[:64],
        parameters=parameters,
    )


def _score(name: CodedConcept, value: float, algorithm: AlgorithmIdentification) -> Measurement:
    return Measurement(name=name, value=float(value), unit=UNITLESS, algorithm_id=algorithm)


def _sources(images: Sequence[ImageResult]) -> list[SourceImageForMeasurementGroup]:
    return [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=i.header.SOPClassUID,
            referenced_sop_instance_uid=i.header.SOPInstanceUID,
        )
        for i in images
    ]


def build_report(exam: ExamResult, uid: UidSource) -> Dataset:
    assessment = exam.assessment
    recommendation = assessment.recommendation
    threshold = recommendation.recall_threshold if recommendation else None
    source = recommendation.threshold_source if recommendation else None
    algorithm = _algorithm(exam, threshold, source)
    exam_measurements = []
    if assessment.exam_score is not None:
        exam_measurements.append(_score(EXAM_SCORE, assessment.exam_score, algorithm))
    if recommendation is not None and recommendation.exam_probability is not None:
        exam_measurements.append(_score(PROBABILITY, recommendation.exam_probability, algorithm))
    if threshold is not None:
        exam_measurements.append(_score(THRESHOLD, threshold, algorithm))
    evaluations = []
    if recommendation is not None and recommendation.recall is not None:
        verdict = RECALL if recommendation.recall else ROUTINE
        evaluations.append(QualitativeEvaluation(RECOMMENDATION, verdict))
    groups = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid(exam.study_id, "exam"), "exam"),
            algorithm_id=algorithm,
            finding_sites=[FindingSite(BREAST)],
            measurements=exam_measurements or None,
            qualitative_evaluations=evaluations or None,
            source_images=_sources(exam.images),
        )
    ]
    for breast in assessment.breasts:
        of_breast = [i for i in exam.images if i.laterality == breast.laterality]
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid(exam.study_id, "breast", breast.laterality.value),
                    f"breast {breast.laterality.value}",
                ),
                algorithm_id=algorithm,
                finding_sites=[FindingSite(BREAST_SITES[breast.laterality])],
                measurements=[_score(BREAST_SCORE, breast.score, algorithm)],
                source_images=_sources(of_breast),
            )
        )
    for image in exam.images:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid(image.image_id, "image"), f"{image.laterality.value}-{image.view.value}"
                ),
                algorithm_id=algorithm,
                finding_sites=[FindingSite(BREAST_SITES[image.laterality])],
                measurements=[_score(IMAGE_SCORE, image.score, algorithm)],
                qualitative_evaluations=(
                    [QualitativeEvaluation(INPUT_UNLIKE_TRAINING, YES)]
                    if PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value in image.warnings
                    else None
                ),
                source_images=_sources([image]),
            )
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid("device"), name=SOFTWARE, manufacturer_name=MANUFACTURER
    )
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=SCREENING_MAMMOGRAPHY,
        imaging_measurements=groups,
        # The image library (TID 1600) describes each image by its orientation and detector
        # spacing; film scans and some exports lack them, and then the groups' source images
        # and the evidence sequence are the references.
        referenced_images=(
            [i.header for i in exam.images]
            if all(_describable(i.header) for i in exam.images)
            else None
        ),
    )
    sr = ComprehensiveSR(
        evidence=[i.header for i in exam.images],
        content=report[0],
        series_instance_uid=uid(exam.study_id, "report-series"),
        series_number=REPORT_SERIES_NUMBER,
        sop_instance_uid=uid(exam.study_id, exam.model_version_id, "report"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="mammoscreen AI results",
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _describable(header: Dataset) -> bool:
    return len(header.get("PatientOrientation") or ()) == 2 and "ImagerPixelSpacing" in header


def full_size_heatmap(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The 1/4-size heatmap resized onto the source image's pixel grid, in [0, 1]."""
    small = PILImage.fromarray(np.clip(heatmap, 0, 1).astype(np.float32), mode="F")
    return np.asarray(small.resize((columns, rows), PILImage.Resampling.BILINEAR), np.float32)


def build_heatmap(image: ImageResult, exam: ExamResult, uid: UidSource) -> Dataset:
    assert image.heatmap is not None
    rows, columns = int(image.header.Rows), int(image.header.Columns)
    heat = full_size_heatmap(image.heatmap, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="mammoscreen screening model",
        family=ALGORITHM_FAMILY,
        version=exam.model_version_name[:64],
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="malignancy heatmap",
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=HEATMAP,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[BREAST_SITES[image.laterality]],
    )
    segmentation = hd.seg.Segmentation(
        source_images=[image.header],
        pixel_array=heat[np.newaxis, :, :, np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[segment],
        series_instance_uid=uid(exam.study_id, "heatmap-series"),
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=uid(image.image_id, exam.model_version_id, "heatmap"),
        instance_number=_instance_number(exam, image),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=SOFTWARE,
        software_versions=exam.model_version_name[:64],
        device_serial_number="1",
        series_description="mammoscreen AI heatmaps",
        omit_empty_frames=False,
        transfer_syntax_uid=hd.uid.UID("1.2.840.10008.1.2.5"),  # RLE lossless: small
    )
    # The source's rows and columns, so the map lies on the image as the image lies.
    segmentation.PatientOrientation = image.header.get("PatientOrientation") or ""
    return segmentation


def build_capture(image: ImageResult, exam: ExamResult, uid: UidSource) -> Dataset:
    assert image.heatmap is not None
    assert image.pixels is not None
    rows, columns = image.pixels.shape
    rgb = burn_in(image.pixels, full_size_heatmap(image.heatmap, rows, columns))
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=image.header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.YBR_FULL_422,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uid(exam.study_id, "capture-series"),
        series_number=CAPTURE_SERIES_NUMBER,
        sop_instance_uid=uid(image.image_id, exam.model_version_id, "capture"),
        instance_number=_instance_number(exam, image),
        manufacturer=MANUFACTURER,
        laterality=image.laterality.value,
        # highdicom takes single letters only; the source's own value is copied below.
        patient_orientation=("A", "F"),
        transfer_syntax_uid=hd.uid.UID("1.2.840.10008.1.2.4.50"),  # JPEG baseline
        series_description="mammoscreen AI heatmaps burnt in",
    )
    capture.BurnedInAnnotation = "YES"
    capture.PatientOrientation = list(image.header.get("PatientOrientation") or [])
    return capture


def _instance_number(exam: ExamResult, image: ImageResult) -> int:
    return 1 + [i.image_id for i in exam.images].index(image.image_id)


def render_exam(
    exam: ExamResult, deidentifier: Deidentifier, *, captures: bool = False
) -> list[RenderedObject]:
    uid = UidSource(deidentifier)
    exam = dataclasses.replace(
        exam, images=[dataclasses.replace(i, header=as_source(i.header)) for i in exam.images]
    )
    rendered = [RenderedObject("report", None, build_report(exam, uid))]
    for image in exam.images:
        if image.heatmap is None:
            continue
        rendered.append(RenderedObject("heatmap", image.image_id, build_heatmap(image, exam, uid)))
        if captures and image.pixels is not None:
            rendered.append(
                RenderedObject("capture", image.image_id, build_capture(image, exam, uid))
            )
    return rendered
