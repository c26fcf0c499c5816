"""Backups that restore (devstack/backup.py, `screening admin backup`): a stack with a
screened batch is backed up with the embedded server's pg_dump and a copy of its bucket,
restored into a fresh stack, and that stack serves the same results, exams, export, heatmap
and viewer page; a damaged backup or an occupied target is refused before anything changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import StackState, down, up
from devstack.synth import SynthOptions, generate_exams
from mammoscreen_client import Client
from shared.config import Settings
from tests.e2e.test_cli_submit import screening
from tests.helpers import stack_environ

pytestmark = pytest.mark.e2e

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)


def _served(env: dict[str, str], api_key: str, batch_id: str) -> dict[str, Any]:
    """What a site reads of the batch, through the services of `env`'s stack."""
    headers = {"Authorization": f"Bearer {api_key}"}
    results_url = env["SCREENING_RESULTS_URL"]
    with httpx.Client(base_url=results_url, headers=headers, timeout=60) as http:
        page = http.get(f"/v1/batches/{batch_id}/results").json()
        served = {
            "batch": http.get(f"/v1/batches/{batch_id}").json(),
            "results": page,
            "exams": http.get(f"/v1/batches/{batch_id}/exams").json(),
            "export": http.get(f"/v1/batches/{batch_id}/export", params={"format": "csv"}).text,
            "heatmap": http.get(f"/v1/images/{page['items'][0]['id']}/heatmap.png").content,
        }
    with httpx.Client(base_url=results_url, timeout=60) as viewer:
        viewer.post("/viewer/login", data={"api_key": api_key})
        served["viewer"] = viewer.get(f"/viewer/batches/{batch_id}").text
    return served


def test_a_backup_restores_into_a_fresh_stack_that_serves_the_same_results(
    stack: StackState, other_settings: Settings, tmp_path: Path
) -> None:
    exams = generate_exams(tmp_path / "exams", exams=2, seed=41, options=SMALL)
    api_key = stack.env["SCREENING_API_KEY"]
    with Client.from_env(stack.env) as client:
        batch = client.create_batch("backed up")
        client.upload(batch["id"], [i.path for i in exams])
        client.close_batch(batch["id"])
        assert client.wait(batch["id"], timeout=300)["status"] == "completed"
    before = _served(stack.env, api_key, batch["id"])
    assert [r["status"] for r in before["results"]["items"]] == ["done"] * 8

    backup = tmp_path / "backup"
    made = screening(stack.service_env, "admin", "backup", "create", str(backup))
    assert made.returncode == 0, made.stderr
    assert "objects" in made.stdout
    assert (backup / "database.dump").stat().st_size > 0

    fresh = up(tmp_path / "fresh", environ=stack_environ(other_settings))
    try:
        # The fresh stack made a tenant of its own: restore refuses to overwrite it unasked.
        refused = screening(fresh.service_env, "admin", "backup", "restore", str(backup))
        assert refused.returncode == 2
        assert "already holds 1 tenants" in refused.stderr

        # A damaged backup is refused whole, before anything changes.
        damaged = tmp_path / "damaged"
        screening(stack.service_env, "admin", "backup", "create", str(damaged))
        victim = next(p for p in (damaged / "objects").rglob("*") if p.is_file())
        victim.write_bytes(victim.read_bytes() + b"x")
        broken = screening(
            fresh.service_env, "admin", "backup", "restore", str(damaged), "--replace"
        )
        assert broken.returncode == 2
        assert "the backup is damaged" in broken.stderr

        restored = screening(
            fresh.service_env, "admin", "backup", "restore", str(backup), "--replace"
        )
        assert restored.returncode == 0, restored.stderr
        after = _served(fresh.env, api_key, batch["id"])
        assert fresh.env["SCREENING_RESULTS_URL"] != stack.env["SCREENING_RESULTS_URL"]
        for what in before:
            assert after[what] == before[what], what
    finally:
        assert down(tmp_path / "fresh") == []
