"""A non-learned baseline: the score of the brightest blob in the breast.

It answers "is there a bright, compact spot here?" and nothing else, so on data where
malignant and benign findings share their size and contrast it should do little better than
chance at telling malignant exams from the rest. It is a real detector, though: it responds
to lesions (a test checks that it separates exams with a lesion from normal ones), so a low
score for malignancy says the data is hard, not that the baseline is blind.

Blobness is the smaller of the two negated Hessian eigenvalues of the Gaussian-smoothed
image, scale-normalised (sigma^2), at a few scales: a bright blob curves down in every
direction, while an edge (skin line, pectoral muscle border) or a line (a vessel, a duct)
is flat along itself, so its smaller eigenvalue is near zero and it does not score.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

# Scales in pixels of the model input (about 0.4 mm per pixel at the default size): from a
# calcification cluster's specks to a 2 cm mass.
SCALES_PX = (1.5, 3.0, 6.0, 12.0)
# Ignore this many pixels inside the breast's outline: the skin line and the padding edge.
MARGIN_PX = 12


def breast_interior(inputs: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Pixels of the breast (brighter than the padding and background), away from its edge."""
    background = float(np.percentile(inputs, 5))
    spread = float(np.percentile(inputs, 95)) - background
    mask = inputs > background + 0.2 * spread
    eroded: NDArray[np.bool_] = ndimage.binary_erosion(mask, iterations=MARGIN_PX)
    return eroded


def blobness(inputs: NDArray[np.float32], sigma: float) -> NDArray[np.float64]:
    image = inputs.astype(np.float64)
    hrr = ndimage.gaussian_filter(image, sigma, order=(2, 0))
    hcc = ndimage.gaussian_filter(image, sigma, order=(0, 2))
    hrc = ndimage.gaussian_filter(image, sigma, order=(1, 1))
    # Eigenvalues of [[hrr, hrc], [hrc, hcc]]; the larger one bounds how flat the blob is.
    mean = (hrr + hcc) / 2
    root = np.sqrt(((hrr - hcc) / 2) ** 2 + hrc**2)
    larger = mean + root
    result: NDArray[np.float64] = np.maximum(0.0, -larger) * sigma**2
    return result


def brightest_blob_score(inputs: NDArray[np.float32]) -> float:
    """The strongest blob response inside the breast, over all scales (a view's score)."""
    interior = breast_interior(inputs)
    if not interior.any():
        return 0.0
    return max(float(blobness(inputs, sigma)[interior].max()) for sigma in SCALES_PX)
