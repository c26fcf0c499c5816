"""Out-of-distribution warnings: a model version keeps a compact reference of its training
inputs, and an image far from it is flagged `input_unlike_training_data`.

The reference is the mean and the (shrunk) covariance of the inputs' statistics
(`shared.imaging.preprocess.INPUT_STATISTICS`: grey levels after the VOI transform, breast
area, background, saturation, texture at two scales), and the distance is Mahalanobis'. The
threshold is set on images the mean and covariance were not fitted on (every other training
image): the 99.5th percentile of their distances, so fresh images of the training mix are
flagged about 0.5% of the time. Plain numpy: no torch needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.db.models import PredictionWarning
from shared.imaging.preprocess import INPUT_STATISTICS

INPUT_UNLIKE_TRAINING_DATA = PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value
# Fewest training images a reference is fitted on; a smaller run's model gets none (and its
# images no warning), rather than a reference that flags at random.
MIN_REFERENCE_IMAGES = 40
# Shrinkage of the correlations towards none: statistics of a few hundred images estimate
# them roughly, and an almost singular covariance would call any small unseen combination
# "far".
SHRINKAGE = 0.1
FLAG_QUANTILE = 0.995


@dataclass(frozen=True)
class InputReference:
    statistics: list[str]
    mean: list[float]
    precision: list[list[float]]  # inverse of the shrunk covariance
    threshold: float  # a distance above this flags the image
    images: int  # how many training images it describes

    def distance(self, statistics: NDArray[np.float64]) -> float:
        delta = np.asarray(statistics, dtype=np.float64) - np.asarray(self.mean)
        return float(np.sqrt(max(0.0, float(delta @ np.asarray(self.precision) @ delta))))

    def unlike(self, distance: float) -> bool:
        return distance > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InputReference | None:
        """The stored reference, or None when there is none or it describes other statistics
        than this code computes (an older version: no warning rather than a wrong one)."""
        if not data or data.get("statistics") != list(INPUT_STATISTICS):
            return None
        return cls(**data)


def _precision(samples: NDArray[np.float64]) -> NDArray[np.float64]:
    """Inverse covariance, from correlations shrunk towards none and each statistic's spread
    no smaller than its floor in INPUT_STATISTICS."""
    floors = np.array(list(INPUT_STATISTICS.values()))
    covariance = np.atleast_2d(np.cov(samples, rowvar=False))
    spread = np.sqrt(np.maximum(np.diag(covariance), 1e-12))
    correlation = covariance / np.outer(spread, spread)
    correlation = (1 - SHRINKAGE) * correlation + SHRINKAGE * np.eye(len(spread))
    scale = np.maximum(spread, floors)
    result: NDArray[np.float64] = np.linalg.inv(correlation * np.outer(scale, scale))
    return result


def fit_reference(statistics: NDArray[np.float64]) -> InputReference | None:
    """A reference from training images' statistics (N, len(INPUT_STATISTICS)), or None when
    there are fewer than MIN_REFERENCE_IMAGES."""
    samples = np.asarray(statistics, dtype=np.float64)
    if len(samples) < MIN_REFERENCE_IMAGES:
        return None
    fit, held_out = samples[0::2], samples[1::2]
    mean = fit.mean(axis=0)
    precision = _precision(fit)
    deltas = held_out - mean
    distances = np.sqrt(np.maximum(0.0, np.einsum("ij,jk,ik->i", deltas, precision, deltas)))
    threshold = float(np.quantile(distances, FLAG_QUANTILE))
    # The published reference uses every image; the threshold keeps its held-out calibration.
    return InputReference(
        statistics=list(INPUT_STATISTICS),
        mean=samples.mean(axis=0).tolist(),
        precision=_precision(samples).tolist(),
        threshold=threshold,
        images=len(samples),
    )
