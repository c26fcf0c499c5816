"""Training as real processes: the trainer worker killed mid-run resumes from its checkpoint;
`screening train`, `models promote` and `models rollback` change what the running inference
worker records, without restarting it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from devstack.stack import StackState, down, kill_service, start_service_again, up
from devstack.synth import generate_exams
from mammoscreen_client import Client, submit_training_folder
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import TrainingEpoch
from tests.factories import SMALL_SYNTH, TINY_TRAINING
from tests.helpers import stack_environ, wait_for

pytestmark = pytest.mark.e2e

SMALL = SMALL_SYNTH
TINY = TINY_TRAINING  # seconds per epoch, so a run can be killed mid-way
FORCE = ("--force", "--reason")
FAST_RECOVERY = {
    "SCREENING_TRAINING_HEARTBEAT_S": "0.5",
    "SCREENING_TRAINING_STALE_S": "4",
    "SCREENING_SWEEP_INTERVAL_S": "1",
    "SCREENING_SHIPPED_MODEL": "none",  # start from the untrained model: this test trains its own
}


@pytest.fixture(scope="module")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("training-data")
    generate_exams(folder, exams=32, seed=41, options=SMALL)
    return folder


@pytest.fixture
def training_stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    environ = stack_environ(settings, FAST_RECOVERY)
    state = up(tmp_path / "stack", environ=environ)
    yield state
    assert down(tmp_path / "stack") == [], "processes left running after down"


def test_a_killed_trainer_resumes_from_its_last_checkpoint(
    training_stack: StackState, training_data: Path, tmp_path: Path
) -> None:
    with Client.from_env(training_stack.env) as client:
        run = submit_training_folder(
            client, training_data, name="killed", seed=5, hyperparameters={**TINY, "epochs": 12}
        )
        wait_for(
            lambda: client.training_run(run["id"])["epochs_done"] >= 2,
            timeout=180,
            what="two epochs",
        )
        kill_service(tmp_path / "stack", "trainer", signal.SIGKILL)
        killed_at = client.training_run(run["id"])
        assert killed_at["status"] == "running"
        assert 2 <= killed_at["epochs_done"] < 12, "the run finished before the kill"
        start_service_again(tmp_path / "stack", "trainer")
        final = client.wait_training(run["id"], timeout=300, poll=0.5)

    assert final["status"] == "completed", final
    assert final["attempts"] == 2
    curve = final["curve"]
    assert [point["epoch"] for point in curve] == list(range(12)), "a gap or a duplicate epoch"
    attempts = [point["attempt"] for point in curve]
    assert attempts[: killed_at["epochs_done"]] == [1] * killed_at["epochs_done"]
    assert attempts[-1] == 2
    with session_scope(training_stack.env["SCREENING_DATABASE_URL"]) as session:
        rows = session.scalars(select(TrainingEpoch.epoch)).all()
    assert sorted(rows) == list(range(12))
    # Registered, and judged: a handful of test exams cannot show it is any good.
    assert final["model_version"]["status"] == "rejected"
    assert final["evaluation"]["test"]["exams"] > 0


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _screen(client: Client, paths: list[Path], name: str) -> list[dict[str, Any]]:
    batch = client.create_batch(name)
    client.upload(batch["id"], paths)
    client.close_batch(batch["id"])
    client.wait(batch["id"], timeout=180, poll=0.5)
    return list(client.iter_results(batch["id"]))


def test_promote_and_rollback_change_what_new_predictions_record(
    training_stack: StackState, training_data: Path
) -> None:
    env = training_stack.env
    names = []
    for seed in (1, 2):
        trained = _cli(
            env,
            "train",
            str(training_data),
            "--name",
            f"cli-{seed}",
            "--seed",
            str(seed),
            "--epochs",
            "2",
            "--hyperparameters",
            str(TINY).replace("'", '"'),
            "--wait",
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        # Two epochs judged on a handful of test exams: rejected, and never offered for
        # promotion.
        assert "as REJECTED" in trained.stdout, trained.stdout
        assert "Promote it with" not in trained.stdout
        names.append(trained.stdout.split("registered ")[1].split(" as REJECTED")[0])
    first, second = names
    exam = sorted(training_data.glob("exam00000_*.dcm"))
    worker_pid = training_stack.services["worker"]

    with Client.from_env(env) as client:
        before = _screen(client, exam, "before")
        assert {r["model_version"]["trained"] for r in before} == {False}

        refused = _cli(env, "models", "promote", first)
        assert refused.returncode == 1
        assert "model_rejected" in refused.stderr
        assert _cli(env, "models", "promote", first, "--force").returncode == 2  # no reason
        forced = [*FORCE, "first trial"]
        assert _cli(env, "models", "promote", first, *forced).returncode == 0
        assert {r["model_version"]["name"] for r in _screen(client, exam, "first")} == {first}

        promoted = _cli(env, "models", "promote", second, *FORCE, "second trial")
        assert f"retired {first}" in promoted.stdout
        assert {r["model_version"]["name"] for r in _screen(client, exam, "second")} == {second}

        rolled_back = _cli(env, "models", "rollback")
        assert rolled_back.returncode == 0, rolled_back.stderr
        assert {r["model_version"]["name"] for r in _screen(client, exam, "back")} == {first}
        statuses = {m["name"]: m["status"] for m in client.models()}
    assert (statuses[first], statuses[second]) == ("active", "retired")
    assert training_stack.services["worker"] == worker_pid  # the same worker throughout
    listed = _cli(env, "models", "list")
    assert first in listed.stdout
    assert "active" in listed.stdout
