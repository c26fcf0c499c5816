"""Bring your own model: a TorchScript model scripted from a small network, imported with its
manifest through the CLI, promoted, and serving a batch end to end through the real worker
code, its scores those of the site's own model on the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from torch import nn

from devstack.synth import SynthImage, generate_exams
from shared.config import CONNECTION_FIELDS, Settings, settings_to_environ
from shared.db.models import Laterality
from shared.imaging.decode import decode_image
from shared.ml.imported import Manifest
from shared.ml.registry import find_model, promote
from shared.storage import ObjectStore
from tests.factories import SMALL_SYNTH, make_tenant
from tests.helpers import auth, files_field, screen_everything

ROOT = Path(__file__).resolve().parents[3]


class SiteNet(nn.Module):
    """What a site might have trained: an RGB network with two softmax outputs
    (normal, malignant), as ImageNet-style models are."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 5, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.amax(self.features(x), dim=(2, 3))
        return torch.softmax(self.head(pooled), dim=1)


MANIFEST: dict[str, Any] = {
    "input_height": 128,
    "input_width": 96,
    "channels": 3,
    "normalisation": [0.3, 0.25],
    "orientation": "as_acquired",
    "output": "probability",
    "output_index": 1,
    "recall_threshold": 0.5,
    "description": "a site's own model",
}


def _export(tmp_path: Path, module: nn.Module, manifest: dict[str, Any]) -> tuple[Path, Path]:
    """How a site exports its model: eval mode, torch.jit.script, torch.jit.save."""
    model_path, manifest_path = tmp_path / "site.pt", tmp_path / "manifest.json"
    torch.jit.save(torch.jit.script(module.eval()), str(model_path))
    manifest_path.write_text(json.dumps(manifest))
    return model_path, manifest_path


def _cli(settings: Settings, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    env.update(settings_to_environ(settings, CONNECTION_FIELDS))
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _expected(image: SynthImage, module: nn.Module) -> float:
    """The site's own model on the same image, prepared as its manifest says."""
    manifest = Manifest.from_dict(MANIFEST)
    pixels = decode_image(image.path.read_bytes(), "application/dicom")
    inputs = manifest.preprocess()(pixels, Laterality(image.laterality))
    batch = torch.from_numpy(inputs[None, None]).expand(-1, 3, -1, -1)
    with torch.inference_mode():
        return float(module.eval()(batch)[0, 1])


def test_an_imported_torchscript_model_screens_a_batch_end_to_end(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    site = SiteNet()
    model_path, manifest_path = _export(tmp_path, site, MANIFEST)
    imported = _cli(
        settings, "models", "import", model_path, "--manifest", manifest_path, "--name", "site-v1"
    )
    assert imported.returncode == 0, imported.stderr
    assert "registered candidate site-v1" in imported.stdout
    version = find_model(session=session, name_or_id="site-v1")
    promote(session=session, version=version, actor="operator:test")
    session.commit()

    exams = generate_exams(tmp_path / "exams", exams=2, seed=5, options=SMALL_SYNTH)
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "site model"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([e.path for e in exams]),
        headers=auth(key),
    ).json()
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)

    by_name = {e.path.name: e for e in exams}
    page = results.get(f"/v1/batches/{batch['id']}/results", headers=auth(key)).json()["items"]
    assert len(page) == 8
    for result in page:
        assert result["status"] == "done"
        assert result["model_version"]["name"] == "site-v1"
        assert result["heatmap_url"] is None  # no class activation map to show
        expected = _expected(by_name[result["filename"]], site)
        assert result["score"] == pytest.approx(expected, abs=1e-5)
    scores = [r["score"] for r in page]
    assert np.ptp(scores) > 0, "every image scored the same: the inputs did not reach it"
    exams_page = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key)).json()
    for exam in exams_page["items"]:
        assert exam["model_version"]["name"] == "site-v1"
        assert exam["recall_threshold"] == 0.5
        assert exam["recall"] == ("recall" if exam["exam_score"] >= 0.5 else "routine")
    assert {a["filename"] for a in upload["accepted"]} == set(by_name)
    card = results.get(f"/v1/models/{version.id}", headers=auth(key)).json()["model_card"]
    assert card["imported"] is True
    assert card["validation_on_import"]["images"] == 8


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)  # (B, H, W): not one score per image


@pytest.mark.parametrize(
    ("module", "manifest", "code"),
    [
        (SiteNet(), {**MANIFEST, "output_level": "breast"}, "manifest_invalid"),
        (SiteNet(), {**MANIFEST, "channels": 2}, "manifest_invalid"),
        (SiteNet(), {**MANIFEST, "channels": 1}, "model_failed"),  # it needs three
        (WrongShape(), {**MANIFEST, "channels": 1}, "model_output_invalid"),
    ],
)
def test_a_model_that_does_not_fit_its_manifest_is_refused_and_nothing_registered(
    settings: Settings,
    session: Session,
    tmp_path: Path,
    module: nn.Module,
    manifest: dict[str, Any],
    code: str,
) -> None:
    model_path, manifest_path = _export(tmp_path, module, manifest)
    refused = _cli(
        settings, "models", "import", model_path, "--manifest", manifest_path, "--name", "bad"
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"{code}:"), refused.stderr
    with pytest.raises(Exception, match="no model version"):
        find_model(session=session, name_or_id="bad")
