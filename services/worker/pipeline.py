"""The inference pipeline's moving parts, free of queue and database: prefetching loaders,
dynamic batches, and the forward pass.

Loader threads read, decode and preprocess images while the model runs on the previous batch
(numpy, scipy, PIL and torch release the GIL for their heavy work). A batch is formed from
whatever is ready: up to `max_batch` images, waiting at most `max_wait_s` after the first one
for more, so a lone urgent image is not held back to fill a batch.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from shared.ml.model import ScreeningNet

T = TypeVar("T")
R = TypeVar("R")
# Queue ranks: lower goes first.
STOP, URGENT, NORMAL = -1, 0, 1


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_wait_s: float


class Prefetcher(Generic[T, R]):
    """Runs `prepare` on loader threads; hands results back as they finish, urgent first.

    Urgent items jump both queues: the unstarted work, and the prepared items waiting to be
    batched. So an urgent image claimed while a bulk batch fills the loaders waits for the
    images already being prepared, not for everything queued ahead of it.
    """

    def __init__(self, prepare: Callable[[T], R], *, threads: int) -> None:
        self._prepare = prepare
        self._order = itertools.count()
        self._work: queue.PriorityQueue[tuple[int, int, T | None]] = queue.PriorityQueue()
        self._done: queue.PriorityQueue[tuple[int, int, T, R | BaseException]] = (
            queue.PriorityQueue()
        )
        self._pending = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"loader-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Submitted and not yet handed back by next_batch."""
        return self._pending

    def submit(self, items: Iterable[T], *, urgent: bool = False) -> None:
        rank = URGENT if urgent else NORMAL
        for item in items:
            self._pending += 1
            self._work.put((rank, next(self._order), item))

    def _run(self) -> None:
        while True:
            rank, order, item = self._work.get()
            if item is None:
                return
            try:
                outcome: R | BaseException = self._prepare(item)
            except BaseException as error:  # handed to the batch; the caller decides
                outcome = error
            self._done.put((rank, order, item, outcome))

    def next_batch(self, policy: BatchPolicy) -> list[tuple[T, R | BaseException]]:
        """Block for the first ready item, then take more until full or the wait is over."""
        if self._pending == 0:
            return []
        batch = [self._done.get()]
        deadline = time.monotonic() + policy.max_wait_s
        while len(batch) < policy.max_batch and len(batch) < self._pending:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._done.get(timeout=max(0.0, remaining)))
            except queue.Empty:
                break
        self._pending -= len(batch)
        return [(item, outcome) for _, _, item, outcome in batch]

    def close(self) -> None:
        """Stop the loaders; work not yet started is abandoned (its claims are released by
        the caller or expire)."""
        for _ in self._threads:
            self._work.put((STOP, next(self._order), None))
        for thread in self._threads:
            thread.join()


class Predictor:
    """One forward pass per batch, set up for the device it runs on.

    CUDA: inference mode, channels-last memory, bf16 autocast, pinned host memory and a
    non-blocking copy, optionally torch.compile. CPU: float32 (autocast there is slower than
    it is worth on these convolutions); the thread count is set once per process by the
    model cache.
    """

    def __init__(self, model: ScreeningNet, device: torch.device, *, compile_model: bool) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        if self._cuda:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._raw_model = model
        self._model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if compile_model else model
        )

    def _device_batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        host = torch.from_numpy(np.stack(inputs)[:, None])  # (B, 1, H, W) float32
        if not self._cuda:
            return host
        batch = host.pin_memory().to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, inputs: list[np.ndarray]) -> list[float]:
        """Malignancy probabilities."""
        if not inputs:
            return []
        batch = self._device_batch(inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._cuda):
            logits = self._model(batch)
        return [float(p) for p in torch.sigmoid(logits.float()).cpu()]

    @torch.inference_mode()
    def with_heatmaps(self, inputs: list[np.ndarray]) -> tuple[list[float], np.ndarray]:
        """Probabilities and per-position malignancy probabilities (B, H/s, W/s) from the
        same forward pass (the class activation map through the sigmoid)."""
        if not inputs:
            return [], np.zeros((0, 0, 0), dtype=np.float32)
        batch = self._device_batch(inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._cuda):
            logits, maps = self._raw_model.forward_with_heatmap(batch)
        scores = [float(p) for p in torch.sigmoid(logits.float()).cpu()]
        return scores, torch.sigmoid(maps.float()).cpu().numpy()
