"""What preparing one image costs, per transfer syntax: `prepare_cpu_ms_per_image`.

The worker prepares an image in two stages (shared/imaging/preprocess.py):

- the host's, in a loader thread: parse the header, read the stored values (in place for
  uncompressed pixels, through a decoder otherwise), build the grey table, find the breast
  on a coarse view. `prepare_cpu_ms_per_image` is its CPU time per image: what a GPU host
  must afford per image on its cores, on top of reading the object from the store
  (`cpu_ms_per_image.s3_get`).
- the device's, per batch: look the values up, crop, mirror, resize, standardise, and the
  input statistics and the preview. `prepare_device_ms_per_image` is its time per image on
  the model's device (on a CPU-only machine: CPU time, which the host pays as well).

Both in this process on one thread (torch's too), the median of three passes, on images of
the bench's size written by the synthetic generator in each syntax.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

from devstack.synth import DicomVariant, SynthOptions, generate_exams
from shared.imaging.decode import StoredPixels, read_pixels
from shared.imaging.formats import MediaType
from shared.imaging.preprocess import InputGeometry, Preprocess
from shared.imaging.renders import PREVIEW_SHRINK

SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless)
PASSES = 3


Prepared = list[tuple[StoredPixels, InputGeometry]]


def _median_per_image(
    run: Callable[[], object], images: int, *, clock: Callable[[], float]
) -> float:
    costs = []
    for _ in range(PASSES):
        started = clock()
        run()
        costs.append((clock() - started) / images * 1000)
    return statistics.median(costs)


def host_stage(files: list[bytes], preprocess: Preprocess) -> Prepared:
    """The loader thread's part, as the worker's `ScreeningRun.prepare` after the read."""
    prepared = []
    for data in files:
        stored = read_pixels(data, MediaType.DICOM)
        prepared.append((stored, preprocess.place(stored, None)))
    return prepared


def device_stage(
    prepared: Prepared, preprocess: Preprocess, device: torch.device, batch_size: int
) -> None:
    """The model thread's part before the forward pass, as the worker's `_forward`."""
    for start in range(0, len(prepared), batch_size):
        batch = preprocess.make_inputs(
            prepared[start : start + batch_size],
            device,
            statistics=True,
            preview_shrink=PREVIEW_SHRINK,
        )
        batch.inputs.sum().item()  # waits for the device


def prepare_costs(
    data_dir: Path,
    options: SynthOptions,
    preprocess: Preprocess,
    device: torch.device,
    *,
    exams: int = 4,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """{"prepare_cpu_ms_per_image": {syntax: ms}, "prepare_device_ms_per_image": {...}}."""
    host: dict[str, float] = {}
    on_device: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device_clock = time.process_time if device.type == "cpu" else time.perf_counter
    try:
        for syntax in SYNTAXES:
            name = UID(syntax).keyword or syntax
            images = generate_exams(
                data_dir / name,
                exams=exams,
                seed=505,
                options=options,
                variants=(DicomVariant(transfer_syntax=syntax),),
            )
            files = [image.path.read_bytes() for image in images]
            prepared = host_stage(files, preprocess)  # warm-up: decoders, the table cache
            device_stage(prepared, preprocess, device, batch_size)
            host[name] = _median_per_image(
                functools.partial(host_stage, files, preprocess),
                len(files),
                clock=time.process_time,
            )
            on_device[name] = _median_per_image(
                functools.partial(device_stage, prepared, preprocess, device, batch_size),
                len(files),
                clock=device_clock,
            )
    finally:
        torch.set_num_threads(threads)
    return {
        "prepare_cpu_ms_per_image": {k: round(v, 2) for k, v in host.items()},
        "prepare_device_ms_per_image": {k: round(v, 2) for k, v in on_device.items()},
    }
