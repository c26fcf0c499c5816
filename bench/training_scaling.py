"""Training throughput, part of `make bench-model`: images per second of training steps on one
process, and how it scales to two gloo processes.

The same examples, configuration and seed each time, through the trainer's own epoch loop
(shared/ml/training.py) with the inputs in memory, so what is timed is the training steps and
the gradient exchange, not decoding or validation:

- `train_images_per_s`: one process, torch's threads left at every core (the trainer's
  default);
- `train_scaling_2proc`: images/s of two processes of one torch thread each, joined by gloo
  (DistributedDataParallel), over one process of one thread.
"""

from __future__ import annotations

import csv
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.db.models import Laterality, TrainingLabel, View
from shared.imaging.decode import decode_image
from shared.imaging.preprocess import Preprocess
from shared.ml.config import Example, TrainingConfig
from shared.ml.data import TrainingSplit
from shared.ml.training import Placement, Trainer, model_config

Loaded = tuple[list[Example], list[np.ndarray]]


def load_examples(folder: Path, config: TrainingConfig, count: int) -> Loaded:
    """The first `count` images of a generated folder, preprocessed for `config`."""
    preprocess = Preprocess(config.input_height, config.input_width)
    examples, arrays = [], []
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    for index, row in enumerate(rows):
        laterality = Laterality(row["laterality"])
        pixels = decode_image((folder / row["file"]).read_bytes(), "application/dicom")
        arrays.append(preprocess(pixels, laterality).astype(np.float16))
        examples.append(
            Example(
                uuid.UUID(int=index),
                row["patient"],
                row["study"],
                laterality,
                View(row["view"]),
                TrainingLabel(row["label"]),
            )
        )
    return examples, arrays


def _epoch_images_per_s(
    loaded: Loaded, config: TrainingConfig, placement: Placement
) -> tuple[float, int]:
    examples, arrays = loaded
    stride = model_config(config).output_stride
    split = TrainingSplit.in_memory(examples, arrays, [None] * len(examples), stride=stride)
    trainer = Trainer(config, seed=0, train=split, validation=None, placement=placement)
    trainer.run_epoch()  # the first epoch warms up allocators and the gloo connection
    started = time.perf_counter()
    trainer.run_epoch()
    seconds = time.perf_counter() - started
    return len(trainer.epoch_examples) / seconds, len(trainer.epoch_examples)


def _two_processes(loaded: Loaded, config: TrainingConfig) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [
        context.Process(target=_timed_rank, args=(rank, loaded, config, port, queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a scaling process ended with {process.exitcode}")
    # Each rank times its own second epoch; the slower one sets the pace.
    timings = [queue.get() for _ in processes]
    return float(sum(n for n, _ in timings) / max(s for _, s in timings))


def _timed_rank(rank: int, loaded: Loaded, config: TrainingConfig, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rate, images = _epoch_images_per_s(loaded, config, Placement(rank=rank, world_size=2))
        out.put((images, images / rate))
        dist.barrier()  # leave together: a group torn down under a peer can abort it
    finally:
        dist.destroy_process_group()


def measure(folder: Path, config: TrainingConfig, *, images: int = 192) -> dict[str, Any]:
    loaded = load_examples(folder, config, images)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        all_cores, _ = _epoch_images_per_s(loaded, config, Placement())
        torch.set_num_threads(1)
        one_thread, _ = _epoch_images_per_s(loaded, config, Placement())
    finally:
        torch.set_num_threads(threads)
    two_processes = _two_processes(loaded, config)
    return {
        "train_images_per_s": all_cores,
        "train_images_per_s_1thread": one_thread,
        "train_images_per_s_2proc_1thread": two_processes,
        "train_scaling_2proc": two_processes / one_thread,
        "train_scaling_images": len(loaded[0]),
    }
