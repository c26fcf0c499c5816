"""The training worker's own process settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
