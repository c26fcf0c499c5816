"""The generator's pictures in docs/imaging.md: `python -m devstack.figures docs/images`.

`synthetic-anatomy.png`: the ellipse anatomy (what the shipped model was trained on) beside
the realistic one in each BI-RADS density class; `synthetic-domains.png`: one MLO view in
each style (digital, film scan, vendor-processed), as stored, windowed to its full range.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from devstack.synth import (
    SynthOptions,
    _breast_geometry,
    _realistic_anatomy,
    generate_exams,
)

SHRINK = 4


def _grey(pixels: np.ndarray) -> np.ndarray:
    scaled = (pixels - pixels.min()) / max(1e-9, float(np.ptp(pixels)))
    return np.asarray(np.round(scaled[::SHRINK, ::SHRINK] * 255), dtype=np.uint8)


def _stored(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    return pixels.max() - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def anatomy_panel() -> np.ndarray:
    options = SynthOptions(anatomy="realistic")
    shape = (options.height, options.width)
    with tempfile.TemporaryDirectory() as folder:
        ellipse = generate_exams(Path(folder), exams=1, seed=3, options=SynthOptions())
        tiles = [_grey(_stored(ellipse[0].path))]
    for seed, (name, fraction) in enumerate(
        (("A", 0.15), ("B", 0.38), ("C", 0.62), ("D", 0.84)), start=1
    ):
        rng = np.random.default_rng(seed)
        _, _, geometry = _breast_geometry("CC", shape, rng)
        image = _realistic_anatomy("CC", shape, geometry, rng, options, (name, fraction), 0.03)[0]
        tiles.append(_grey(np.clip(image, 0, 1)))
    return np.hstack(tiles)


def domains_panel() -> np.ndarray:
    tiles = []
    with tempfile.TemporaryDirectory() as folder:
        for style in ("digital", "film", "vendor"):
            options = SynthOptions(style=style, views=("MLO",), anatomy="ellipse")
            images = generate_exams(Path(folder) / style, exams=1, seed=4, options=options)
            tiles.append(_grey(_stored(images[0].path)))
    return np.hstack(tiles)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(anatomy_panel()).save(out / "synthetic-anatomy.png", optimize=True)
    Image.fromarray(domains_panel()).save(out / "synthetic-domains.png", optimize=True)
    print(f"wrote {out / 'synthetic-anatomy.png'} and {out / 'synthetic-domains.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
