"""`screening submit`, `status`, `results` and `batches` against the real stack processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import StackState
from devstack.synth import SynthOptions, generate_exams

pytestmark = pytest.mark.e2e

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)


def screening(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**clean, **env, "HOME": str(Path(env.get("HOME", "/nonexistent")))},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_submit_a_folder_with_progress_then_export_csv(stack: StackState, tmp_path: Path) -> None:
    folder = tmp_path / "exams"
    generate_exams(folder, exams=16, seed=23, options=SMALL)  # 64 images
    (folder / "notes.txt").write_text("not an image; folders are filtered by extension")
    submitted = screening(stack.env, "submit", str(folder), "--batch-name", "cli", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    # Both progress bars while uploading (files and bytes), then the screening bar.
    assert "files : 100%" in submitted.stderr
    assert "upload: 100%" in submitted.stderr
    assert "screen: 100%" in submitted.stderr
    assert "64/64" in submitted.stderr
    out = submitted.stdout
    assert "64 images accepted, 0 refused" in out
    assert "completed, 64 screened, 0 failed" in out
    assert "16 exams" in out
    batch_id = out.split("batch ")[1].split(":")[0]

    status = screening(stack.env, "status", batch_id)
    assert status.returncode == 0
    assert "completed; done 64" in status.stdout

    exported = tmp_path / "results.csv"
    results = screening(
        stack.env, "results", batch_id, "--format", "csv", "--output", str(exported)
    )
    assert results.returncode == 0, results.stderr
    with open(exported, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 64
    assert {r["status"] for r in rows} == {"done"}
    assert {r["filename"] for r in rows} == {p.name for p in folder.glob("*.dcm")}

    as_json = screening(stack.env, "results", batch_id, "--format", "json")
    assert len(json.loads(as_json.stdout)) == 64
    table = screening(stack.env, "results", batch_id)
    assert len(table.stdout.strip().splitlines()) == 65  # header and one line per image
    listed = screening(stack.env, "batches")
    assert batch_id in listed.stdout

    # Every service process serves /metrics, the workers on their --metrics-port.
    for service in ("ingest", "results", "worker", "trainer"):
        text = httpx.get(stack.metrics_url(service), timeout=30).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples["screening_images_screened_total", ()] == 64, service
        assert ("screening_queue_depth", (("queue", "inference"),)) in samples, service
        assert samples["screening_inference_batch_size_sum", ()] == 64, service
    ingest_text = httpx.get(stack.metrics_url("ingest"), timeout=30).text
    assert any(
        line.startswith("screening_http_requests_total")
        and 'route="/v1/batches/{batch_id}/images"' in line
        and 'status="202"' in line
        for line in ingest_text.splitlines()
    )


def test_errors_say_what_to_fix(stack: StackState, tmp_path: Path) -> None:
    missing_key = {k: v for k, v in stack.env.items() if k != "SCREENING_API_KEY"}
    no_key = screening(missing_key, "batches")
    assert no_key.returncode == 2
    assert "no api key: pass --api-key, set SCREENING_API_KEY" in no_key.stderr
    assert "Traceback" not in no_key.stderr

    wrong_key = screening({**stack.env, "SCREENING_API_KEY": "msk_wrong_key"}, "batches")
    assert wrong_key.returncode == 1
    assert "error: invalid_api_key" in wrong_key.stderr

    nothing = screening(stack.env, "submit", str(tmp_path / "nowhere"))
    assert (nothing.returncode, nothing.stderr.strip()) == (
        2,
        f"error: no such file or folder: {tmp_path / 'nowhere'}",
    )
    unknown = screening(stack.env, "status", "01234567-89ab-7def-8123-456789abcdef")
    assert "error: batch_not_found" in unknown.stderr

    # A config file works where the environment says nothing.
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(
            f'{name} = "{stack.env[f"SCREENING_{name.upper()}"]}"'
            for name in ("ingest_url", "results_url", "api_key")
        )
    )
    from_file = screening({}, "batches", "--config", str(config))
    assert from_file.returncode == 0, from_file.stderr
