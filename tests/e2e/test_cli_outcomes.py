"""`screening outcomes import` and `list` against the real stack processes: a site's CSV of
biopsy and follow-up results, checked line by line before anything is sent."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from devstack.stack import StackState
from devstack.synth import SynthOptions, generate_exams
from mammoscreen_client import Client
from shared.config import settings_from_environ
from shared.db.base import session_scope
from shared.drift import refresh_drift
from tests.e2e.test_cli_submit import screening

pytestmark = pytest.mark.e2e

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
HEADER = ("study_key", "exam_id", "truth", "breast", "source", "date")


def _write(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    return path


def test_a_sites_outcome_file_is_checked_then_imported_and_can_be_imported_again(
    stack: StackState, tmp_path: Path
) -> None:
    exams = generate_exams(tmp_path / "exams", exams=3, seed=31, options=SMALL)
    first_study, second_study, third_study = sorted({image.study for image in exams})
    with Client.from_env(stack.env) as client:
        # The first two studies in one batch; the third, named by its exam id, in another.
        batches = []
        for studies in ((first_study, second_study), (third_study,)):
            batch = client.create_batch("outcomes")
            client.upload(batch["id"], [i.path for i in exams if i.study in studies])
            client.close_batch(batch["id"])
            batches.append(batch["id"])
        (third_exam,) = [exam["id"] for exam in client.iter_exams(batch["id"])]

    # Every problem of the file, by line, and nothing sent.
    broken = _write(
        tmp_path / "broken.csv",
        [
            (first_study, "", "malignant", "right", "biopsy", "2026-10-02"),
            (second_study, "", "cancer", "right", "biopsy", "2026-10-02"),
            ("", "", "normal", "both", "follow_up", "02/10/2026"),
        ],
    )
    refused = screening(stack.env, "outcomes", "import", str(broken))
    assert refused.returncode == 2, refused.stderr
    assert f"{broken}:3: truth 'cancer' is not one of malignant, benign, normal" in refused.stderr
    assert f"{broken}:4: date '02/10/2026' is not a date (YYYY-MM-DD)" in refused.stderr
    assert f"{broken}:4: give exactly one of exam_id and study_key" in refused.stderr
    assert "Traceback" not in refused.stderr

    # A study the service does not know: the line, and nothing recorded.
    unknown = _write(
        tmp_path / "unknown.csv",
        [
            (first_study, "", "malignant", "right", "biopsy", "2026-10-02"),
            ("1.2.3.4.5.999", "", "normal", "both", "follow_up", "2026-11-02"),
        ],
    )
    refused = screening(stack.env, "outcomes", "import", str(unknown))
    assert refused.returncode == 2, refused.stderr
    assert "line(s) 3; nothing was recorded" in refused.stderr

    good = _write(
        tmp_path / "outcomes.csv",
        [
            (first_study, "", "malignant", "right", "biopsy", "2026-10-02"),
            (second_study, "", "normal", "both", "follow_up", "2026-11-02"),
            ("", third_exam, "benign", "left", "surgery", "2026-10-20"),
        ],
    )
    for _ in range(2):  # the second time replaces what the first recorded
        imported = screening(stack.env, "outcomes", "import", str(good))
        assert imported.returncode == 0, imported.stderr
        assert "recorded 3 outcomes for 3 exams from 3 rows" in imported.stdout
    with Client.from_env(stack.env) as client:
        assert [o["truth"] for o in client.outcomes(third_exam)] == ["benign"]
    shown = screening(stack.env, "outcomes", "list", third_exam)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["2026-10-20  benign     left   surgery"]

    # The stack's trainer measures the active version on them once they are screened.
    with Client.from_env(stack.env) as client:
        for batch_id in batches:
            client.wait(batch_id, timeout=300)
    evaluated = screening(
        stack.env,
        "evaluate",
        *(f"--batch={b}" for b in batches),
        "--json",
        str(tmp_path / "e.json"),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.splitlines()
    assert "3 exams (1 malignant), exam AUC" in lines[1]
    assert any(line.startswith("  by manufacturer: ") for line in lines)
    assert "by views: 4 3 exams" in evaluated.stdout
    assert json.loads((tmp_path / "e.json").read_text())["status"] == "completed"

    # The week's drift figures (the stack's workers compute them every drift_interval_s; the
    # test does not wait ten minutes for that, it runs the same computation once).
    with session_scope(settings_from_environ(stack.service_env).database_url) as session:
        assert refresh_drift(session, settings=settings_from_environ(stack.service_env))
    drift = screening(stack.env, "drift", "--json", str(tmp_path / "d.json"))
    assert drift.returncode == 0, drift.stderr  # too few exams for an alarm
    first, inputs = drift.stdout.splitlines()[:2]
    assert re.fullmatch(
        r"week of \d{4}-\d\d-\d\d  \S+  \d+ exams  PSI \d\.\d{3}  "
        r"\(fewer than 150 exams: no alarm\)",
        first,
    ), first
    assert inputs.startswith("  inputs: breast intensity 0.")
    assert "pixel spacing 0.800 mm" in inputs
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["weeks"][0]["exams"] >= 3
