"""The client as a hospital script gets it: `pip install ./client` into a fresh virtual
environment, then used against the running stack with nothing of the server installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from devstack.stack import StackState
from devstack.synth import SynthImage

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = {"torch", "fastapi", "sqlalchemy", "celery", "pydicom", "numpy", "minio"}

SCRIPT = """
import json, os, sys
from pathlib import Path
from mammoscreen_client import Client

paths = [Path(p) for p in sys.argv[1:]]
with Client(ingest_url=os.environ["INGEST"], results_url=os.environ["RESULTS"],
            api_key=os.environ["KEY"]) as client:
    batch = client.create_batch("from a fresh venv")
    upload = client.upload(batch["id"], paths)
    client.close_batch(batch["id"])
    status = client.wait(batch["id"], timeout=180, poll=0.5)
    exams = list(client.iter_exams(batch["id"]))
print(json.dumps({"accepted": len(upload["accepted"]), "counts": status["counts"],
                  "exams": exams}))
"""


@pytest.fixture(scope="module")
def client_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding the client distribution and its own needs only."""
    folder = tmp_path_factory.mktemp("client-venv")
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            str(ROOT / "client"),
        ],
        check=True,
        cwd=folder,
    )
    return python


def test_the_client_installs_alone_and_screens_an_exam(
    client_only_python: Path, stack: StackState, exam: list[SynthImage], tmp_path: Path
) -> None:
    installed = subprocess.run(
        [
            str(client_only_python),
            "-c",
            "import importlib.metadata as m; "
            "print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "mammoscreen-client" in installed
    assert "httpx" in installed
    assert SERVER_PACKAGES.isdisjoint(installed), installed

    run = subprocess.run(
        [str(client_only_python), "-c", SCRIPT, *(str(s.path) for s in exam)],
        cwd=tmp_path,  # not the repository: only the installed client can be imported
        env={
            "PATH": os.environ["PATH"],
            "INGEST": stack.env["SCREENING_INGEST_URL"],
            "RESULTS": stack.env["SCREENING_RESULTS_URL"],
            "KEY": stack.env["SCREENING_API_KEY"],
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["accepted"] == 4
    assert answer["counts"]["done"] == 4
    (exam_result,) = answer["exams"]
    assert exam_result["exam_score"] is not None
    assert exam_result["recall"] in ("recall", "routine")
