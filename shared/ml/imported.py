"""Bring your own model: a site's externally trained TorchScript model, served like ours.

A manifest says what the model expects and what it answers: the input size and channels,
the intensity normalisation, the orientation convention, and whether its output is a logit
or a probability (and which column, for a model with several). `ImportedModel` presents the
TorchScript module as our own networks are presented to the workers: a (B, 1, H, W) input
prepared by `Manifest.preprocess()`, malignancy logits (B,) out. An imported model has no
class activation map, so its results carry no heatmap.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.imaging.preprocess import Preprocess
from shared.ml.checkpoint import load_checkpoint
from shared.ml.model import ScreeningNet

TORCHSCRIPT = "torchscript"


class ManifestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Manifest:
    input_height: int
    input_width: int
    channels: int = 1  # 3: the grey image repeated, as ImageNet-style networks take it
    # "per_image" (zero mean, unit variance per input, as ours), "unit" (grey levels in
    # [0, 1] after the VOI transform), or [mean, std] of those grey levels.
    normalisation: str | list[float] = "per_image"
    # "chest_wall_left" (right breasts mirrored, as ours) or "as_acquired".
    orientation: str = "chest_wall_left"
    output: str = "logit"  # or "probability"
    output_index: int = 0  # the malignancy column of a (B, k) output
    output_level: str = "image"
    # Exam score at or above which it recommends recall; none: no recommendation.
    recall_threshold: float | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """The manifest, or ManifestError saying what to fix."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError("manifest_invalid", f"unknown manifest fields: {unknown}")
        try:
            manifest = cls(**data)
        except TypeError as err:
            raise ManifestError("manifest_invalid", f"manifest: {err}") from err
        manifest.check()
        return manifest

    def check(self) -> None:
        problems = []
        for side in (self.input_height, self.input_width):
            if not isinstance(side, int) or not 32 <= side <= 4096:
                problems.append("input_height and input_width must be integers in 32..4096")
        if self.channels not in (1, 3):
            problems.append("channels must be 1 or 3")
        if not (
            self.normalisation in ("per_image", "unit")
            or (
                isinstance(self.normalisation, list)
                and len(self.normalisation) == 2
                and self.normalisation[1] > 0
            )
        ):
            problems.append('normalisation must be "per_image", "unit" or [mean, std > 0]')
        if self.orientation not in ("chest_wall_left", "as_acquired"):
            problems.append('orientation must be "chest_wall_left" or "as_acquired"')
        if self.output not in ("logit", "probability"):
            problems.append('output must be "logit" or "probability"')
        if self.output_level != "image":
            problems.append(
                'output_level must be "image": breast- and exam-level models (several views '
                "in one input) are not served yet; export a per-view model"
            )
        if self.recall_threshold is not None and not 0 <= self.recall_threshold <= 1:
            problems.append("recall_threshold must be a probability in 0..1")
        if problems:
            raise ManifestError("manifest_invalid", "; ".join(dict.fromkeys(problems)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def preprocess(self) -> Preprocess:
        normalisation: str | tuple[float, float] = (
            self.normalisation
            if isinstance(self.normalisation, str)
            else (float(self.normalisation[0]), float(self.normalisation[1]))
        )
        return Preprocess(
            self.input_height,
            self.input_width,
            normalisation=normalisation,
            orient=self.orientation == "chest_wall_left",
        )


@dataclass(frozen=True)
class ImportedConfig:
    input_height: int
    input_width: int


class ImportedModel(nn.Module):
    """A TorchScript model behind our models' interface: malignancy logits (B,)."""

    def __init__(self, scripted: torch.jit.ScriptModule, manifest: Manifest) -> None:
        super().__init__()
        self.scripted = scripted
        self.manifest = manifest
        self.config = ImportedConfig(manifest.input_height, manifest.input_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.manifest.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out = self.scripted(x)
        if not isinstance(out, torch.Tensor):
            raise ManifestError("model_output_invalid", "the model must return one tensor")
        if out.dim() == 2:
            out = out[:, self.manifest.output_index]
        elif out.dim() != 1:
            raise ManifestError(
                "model_output_invalid",
                f"the model returned shape {tuple(out.shape)}; expected (B,) or (B, k)",
            )
        out = out.float()
        if self.manifest.output == "probability":
            out = torch.logit(out.clamp(1e-6, 1 - 1e-6))
        return out


def manifest_of(architecture: dict[str, Any]) -> Manifest | None:
    """The manifest of an imported version's architecture record; None for ours."""
    if architecture.get("format") != TORCHSCRIPT:
        return None
    return Manifest.from_dict(architecture["manifest"])


def load_model(
    architecture: dict[str, Any], data: bytes, *, device: torch.device
) -> ScreeningNet | ImportedModel:
    """A registered version's network, in eval mode on `device`: ours from its checkpoint,
    an imported one from its TorchScript archive."""
    manifest = manifest_of(architecture)
    if manifest is None:
        return load_checkpoint(data, device=device)
    scripted = torch.jit.load(io.BytesIO(data), map_location=device)
    return ImportedModel(scripted, manifest).to(device).eval()


def preprocess_for(model: ScreeningNet | ImportedModel) -> Preprocess:
    if isinstance(model, ImportedModel):
        return model.manifest.preprocess()
    return Preprocess(model.config.input_height, model.config.input_width)


def validate_imported(model: ImportedModel, inputs: list[np.ndarray]) -> dict[str, Any]:
    """Run the model on prepared inputs of synthetic exams, as a worker will: it must take a
    batch of the manifest's size and give one finite score per image, the same alone as in a
    batch. Raises ManifestError saying what is wrong."""
    batch = torch.from_numpy(np.stack(inputs)[:, None]).float()
    try:
        with torch.inference_mode():
            logits = model(batch)
            single = model(batch[:1])
    except ManifestError:
        raise
    except Exception as err:  # whatever the scripted code raises: the site must hear it
        raise ManifestError(
            "model_failed",
            f"the model failed on {tuple(batch.shape)} inputs prepared per its manifest: "
            f"{type(err).__name__}: {err}",
        ) from err
    if logits.shape != (len(inputs),):
        raise ManifestError(
            "model_output_invalid", f"{len(inputs)} images gave {tuple(logits.shape)} scores"
        )
    if not torch.isfinite(logits).all():
        raise ManifestError("model_output_invalid", "the model gave non-finite scores")
    if not math.isclose(float(single[0]), float(logits[0]), rel_tol=1e-3, abs_tol=1e-3):
        raise ManifestError(
            "model_output_invalid",
            "an image scored differently alone than in a batch: export the model in eval "
            "mode (model.eval() before torch.jit.script or trace)",
        )
    probabilities = torch.sigmoid(logits)
    return {
        "images": len(inputs),
        "probability_range": [float(probabilities.min()), float(probabilities.max())],
    }
