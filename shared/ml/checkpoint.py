"""Checkpoints carry their model's config, so a checkpoint rebuilds its own model."""

from __future__ import annotations

import io
from typing import Any

import torch

from shared.ml.model import ScreeningNet, ScreeningNetConfig, build_model


def checkpoint_bytes(model: ScreeningNet, *, extra: dict[str, Any] | None = None) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "model_config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "extra": extra or {},
        },
        buffer,
    )
    return buffer.getvalue()


def load_checkpoint(data: bytes, *, device: torch.device) -> ScreeningNet:
    """Rebuild the model from its stored config and weights, in eval mode on `device`."""
    # weights_only: a checkpoint from object storage must never be able to run code.
    payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    model = build_model(ScreeningNetConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()
