"""A training run on several processes with torch.distributed, started and watched by the
training task.

The task has claimed the run and scanned its images; it writes what the processes need (a
`RankSpec`) to a private file and starts `training_processes` copies of
`python -m services.worker.training_rank SPEC` with torchrun's environment contract (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The processes join one
process group (NCCL on GPUs, gloo on the CPU), train, and rank 0 writes each epoch's checkpoint
and row as a single process does. The task keeps the run's heartbeat and watches them: if one
dies (killed, out of memory), a collective would wait for it for ever, so the others are
stopped and all are started again from the last checkpoint, up to `training_max_restarts`
times (then the run fails, `training_processes_failed`). If the run was taken over meanwhile,
they are stopped and the task gives up the run.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.config import Settings
from shared.ml.config import TrainingConfig
from shared.ml.data import Scanned
from shared.training_runs import DatasetImage

log = logging.getLogger(__name__)

# A rank that found the run taken over by another attempt exits with this.
LOST_EXIT = 75


class LostRun(Exception):
    """Another attempt took the run over (this worker's heartbeat lapsed)."""


class RanksKeptFailing(Exception):
    """Every restart of a distributed run's processes failed again."""


@dataclass(frozen=True)
class RankSpec:
    """What every process of a distributed run needs to train it."""

    run_id: uuid.UUID
    attempt: int
    seed: int
    config: TrainingConfig
    images: list[DatasetImage]
    scanned: list[Scanned | None]
    held_out: bool
    settings: Settings


def training_device(settings: Settings, *, local_rank: int, local_world_size: int) -> torch.device:
    """A process's device: `training_device`, or with "auto" a GPU of its own when torch sees
    one for every process on this host, else the CPU."""
    if settings.training_device != "auto":
        return torch.device(settings.training_device)
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank_threads(settings: Settings, local_world_size: int) -> int:
    """CPU threads for torch in each process: the trainer's setting, or the host's cores
    shared among its processes."""
    return settings.training_torch_threads or max(1, (os.cpu_count() or 1) // local_world_size)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(processes: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _launch(spec_path: Path, world_size: int) -> list[subprocess.Popen[bytes]]:
    port = str(_free_port())
    processes = []
    for rank in range(world_size):
        environment = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.worker.training_rank", str(spec_path)],
                env=environment,
            )
        )
    return processes


def _supervise(
    processes: list[subprocess.Popen[bytes]], lost: threading.Event, poll_s: float = 0.2
) -> list[int]:
    """Wait until every process ends or one fails (the others are then stopped); their exit
    codes. Raises LostRun, the processes stopped, when the run was taken over."""
    while True:
        if lost.is_set():
            _stop(processes)
            raise LostRun()
        codes = [process.poll() for process in processes]
        if all(code == 0 for code in codes):
            return [0] * len(codes)
        if any(code not in (None, 0) for code in codes):
            _stop(processes)
            return [process.returncode for process in processes]
        time.sleep(poll_s)


def train_distributed(spec: RankSpec, *, lost: threading.Event) -> None:
    """Train the run on `training_processes` processes until it is finished; its epochs and
    checkpoints are in the database and the object store as a single process leaves them."""
    settings = spec.settings
    world_size = settings.training_processes
    with tempfile.TemporaryDirectory(prefix="mammoscreen-training-") as folder:
        spec_path = Path(folder) / "spec.pickle"
        spec_path.touch(mode=0o600)  # it holds the settings' secrets
        spec_path.write_bytes(pickle.dumps(spec))
        for launch in range(settings.training_max_restarts + 1):
            processes = _launch(spec_path, world_size)
            log.info(
                "training run %s: %d processes (pids %s)",
                spec.run_id,
                world_size,
                [p.pid for p in processes],
            )
            codes = _supervise(processes, lost)
            if all(code == 0 for code in codes):
                return
            if LOST_EXIT in codes:
                raise LostRun()
            log.warning(
                "training run %s: a process ended with %s; restarting all %d from the last "
                "checkpoint (restart %d of %d)",
                spec.run_id,
                codes,
                world_size,
                launch + 1,
                settings.training_max_restarts,
            )
    raise RanksKeptFailing(
        f"the run's {world_size} training processes failed "
        f"{settings.training_max_restarts + 1} times in a row (the trainer's log says why: out "
        "of memory, a device error); fewer processes, a smaller batch or accumulation_steps "
        "may fit"
    )
