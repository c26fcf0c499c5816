"""One process of a distributed training run: `python -m services.worker.training_rank SPEC`.

Started by the training task (services/worker/distributed.py) with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). It joins the
process group, builds the run's streamed splits from the scan the task made, restores the last
checkpoint and trains; rank 0 writes checkpoints and epoch rows.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from services.worker.distributed import (
    LOST_EXIT,
    LostRun,
    RankSpec,
    rank_threads,
    training_device,
)
from services.worker.training import (
    build_splits,
    initial_weights,
    restore_last_checkpoint,
    train_epochs,
)
from shared.db.models import Split
from shared.logs import log_context
from shared.ml.training import Placement, Trainer
from shared.storage import ObjectStore


def train_rank(spec: RankSpec) -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    settings = spec.settings
    torch.set_num_threads(rank_threads(settings, local_world_size))
    device = training_device(settings, local_rank=local_rank, local_world_size=local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Long: the others wait in a collective while rank 0 alone validates and checkpoints a
    # large run. A dead peer is noticed by the task watching the processes, not by this.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    try:
        store = ObjectStore(settings)
        splits = build_splits(
            spec.images,
            spec.scanned,
            spec.config,
            settings=settings,
            store=store,
            held_out=spec.held_out,
        )
        _, init_weights = initial_weights(spec.config, settings=settings, store=store)
        trainer = Trainer(
            spec.config,
            seed=spec.seed,
            train=splits[Split.TRAIN],
            validation=splits.get(Split.VALIDATION),
            init_weights=init_weights,
            placement=Placement(device, rank, world_size),
        )
        restore_last_checkpoint(trainer, spec.run_id, settings=settings, store=store)
        train_epochs(
            trainer,
            run_id=spec.run_id,
            attempt=spec.attempt,
            settings=settings,
            store=store,
            heartbeat=None,
        )
        # Leave together, once rank 0 has written the last checkpoint: a process group torn
        # down while a peer still uses its connections can abort the process.
        dist.barrier()
        return 0
    except LostRun:
        return LOST_EXIT
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    spec: RankSpec = pickle.loads(Path(argv[0]).read_bytes())  # noqa: S301 (our task wrote it)
    with log_context(run_id=str(spec.run_id)):
        return train_rank(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
