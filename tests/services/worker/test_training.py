"""The training worker's own process settings, and what it keeps between the stages of a run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

from devstack.synth import SynthImage
from services.worker.training import PreparedImages
from shared.config import Settings
from shared.db.models import Laterality, Split, TrainingLabel, View
from shared.imaging.preprocess import Preprocess
from shared.storage import ObjectStore
from shared.training_runs import DatasetImage

ROOT = Path(__file__).resolve().parents[3]
# What a trainer process does on its first run, then what torch was left with.
PROBE = (
    "import torch; "
    "from services.worker.training import trainer_context; "
    "trainer_context(); "
    "print(torch.get_num_threads())"
)


def _trainer_threads(**environ: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    output = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**env, **environ},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(output.split()[-1])


def test_the_trainer_uses_every_core_whatever_the_inference_worker_is_set_to() -> None:
    cores = os.cpu_count() or 1
    assert _trainer_threads() == cores
    # The inference worker's count (one fewer than the cores by default, or its setting)
    # must not leak into training.
    assert _trainer_threads(SCREENING_WORKER_TORCH_THREADS="1") == cores


def test_the_trainer_has_a_thread_setting_of_its_own() -> None:
    assert _trainer_threads(SCREENING_TRAINING_TORCH_THREADS="1") == 1


class CountingStore(ObjectStore):
    """The real store, counting the objects read from it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.reads: list[str] = []

    def get_bytes(self, key: str, *, length: int | None = None) -> bytes:
        self.reads.append(key)
        return super().get_bytes(key, length=length)


def test_the_stages_of_a_run_decode_each_image_once_even_when_inputs_are_not_cached(
    settings: Settings, exam: list[SynthImage]
) -> None:
    store = CountingStore(settings)
    images = []
    for n, synth in enumerate(exam):
        key = f"training-scan/{uuid.uuid4()}"
        store.put_bytes(key, synth.path.read_bytes(), content_type="application/dicom")
        images.append(
            DatasetImage(
                image_id=uuid.uuid4(),
                object_key=key,
                media_type="application/dicom",
                patient_key="p",
                study_key="s",
                laterality=Laterality(synth.laterality),
                view=View(synth.view),
                label=TrainingLabel.MALIGNANT if n % 2 else TrainingLabel.NORMAL,
                split=Split.TRAIN,
                box=(40, 60, 90, 120) if n % 2 else None,
            )
        )
    # No room for inputs: only the placements can spare the second stage its reads.
    uncached = settings.model_copy(update={"training_cache_bytes": 0})
    preprocess = Preprocess(128, 104)
    first = PreparedImages(preprocess, uncached, store).scan(images)
    assert len(store.reads) == len(images)
    again = PreparedImages(preprocess, uncached, store).scan(images)
    assert len(store.reads) == len(images)  # the fold after the first reads nothing to scan
    for one, other in zip(first, again, strict=True):
        assert one is not None
        assert other is not None
        assert one.box == other.box
        assert np.array_equal(one.statistics, other.statistics)
    assert first[1] is not None
    assert first[1].box is not None
    # Another input size is another preparation.
    PreparedImages(Preprocess(64, 52), uncached, store).scan(images)
    assert len(store.reads) == 2 * len(images)
