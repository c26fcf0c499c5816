"""Loads model versions once per worker process and keeps them cached by version id."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

import torch

from services.worker.pipeline import Predictor
from shared.config import Settings
from shared.db.models import ModelVersion
from shared.ml.checkpoint import load_checkpoint
from shared.ml.model import ScreeningNet
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


def pick_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@dataclass(frozen=True)
class LoadedModel:
    version_id: uuid.UUID
    name: str
    trained: bool
    model: ScreeningNet
    device: torch.device
    predictor: Predictor


class ModelCache:
    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self._store = store
        self._device = pick_device(settings.worker_device)
        self._models: dict[uuid.UUID, LoadedModel] = {}
        self._lock = threading.Lock()
        self._compile = settings.worker_compile
        if self._device.type == "cpu" and settings.worker_torch_threads:
            torch.set_num_threads(settings.worker_torch_threads)

    def get(self, version: ModelVersion) -> LoadedModel:
        with self._lock:
            cached = self._models.get(version.id)
            if cached is None:
                log.info(
                    "loading model version %s (%s) on %s", version.name, version.id, self._device
                )
                model = load_checkpoint(
                    self._store.get_bytes(version.checkpoint_key), device=self._device
                )
                predictor = Predictor(model, self._device, compile_model=self._compile)
                cached = LoadedModel(
                    version.id, version.name, version.trained, model, self._device, predictor
                )
                self._models[version.id] = cached
            return cached
