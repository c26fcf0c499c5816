"""Loads model versions once per worker process and keeps them cached by version id."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass

import torch

from services.worker.pipeline import Predictor
from shared.config import Settings
from shared.db.models import ModelVersion
from shared.ml.imported import ImportedModel, load_model
from shared.ml.input_reference import InputReference
from shared.ml.model import ScreeningNet
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


def inference_cpu_threads(settings: Settings) -> int:
    """Threads for the forward pass on the CPU: the setting, or one fewer than the cores.

    The loaders read, decode and preprocess the next batch while the model runs; on two cores
    a model on both made the whole pipeline slower (README "Throughput" has the figures): its
    threads spun waiting for each other while the loaders waited for a core.
    """
    return settings.worker_torch_threads or max(1, (os.cpu_count() or 1) - 1)


def pick_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@dataclass(frozen=True)
class LoadedModel:
    version_id: uuid.UUID
    name: str
    trained: bool
    model: ScreeningNet | ImportedModel
    device: torch.device
    predictor: Predictor
    # What the version's training inputs looked like; None: no out-of-distribution warnings.
    reference: InputReference | None = None

    @property
    def has_heatmaps(self) -> bool:
        """Our networks' class activation maps; an imported model has none."""
        return isinstance(self.model, ScreeningNet)


class ModelCache:
    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self._store = store
        self.device = pick_device(settings.worker_device)
        self._models: dict[uuid.UUID, LoadedModel] = {}
        self._lock = threading.Lock()
        self._compile = settings.worker_compile

    def get(self, version: ModelVersion) -> LoadedModel:
        with self._lock:
            cached = self._models.get(version.id)
            if cached is None:
                log.info(
                    "loading model version %s (%s) on %s", version.name, version.id, self.device
                )
                model = load_model(
                    version.architecture,
                    self._store.get_bytes(version.checkpoint_key),
                    device=self.device,
                )
                predictor = Predictor(model, self.device, compile_model=self._compile)
                cached = LoadedModel(
                    version.id,
                    version.name,
                    version.trained,
                    model,
                    self.device,
                    predictor,
                    InputReference.from_dict(version.input_reference),
                )
                self._models[version.id] = cached
            return cached
