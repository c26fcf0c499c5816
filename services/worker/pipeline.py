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
Prepared = np.ndarray | BaseException
# Queue ranks: lower goes first.
STOP, URGENT, NORMAL = -1, 0, 1


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_wait_s: float


class Prefetcher(Generic[T]):
    """Runs `prepare` on loader threads; hands results back as they finish, urgent first.

    Urgent items jump both queues: the unstarted work, and the prepared items waiting to be
    batched. So an urgent image claimed while a bulk batch fills the loaders waits for the
    images already being prepared, not for everything queued ahead of it.
    """

    def __init__(self, prepare: Callable[[T], np.ndarray], *, threads: int) -> None:
        self._prepare = prepare
        self._order = itertools.count()
        self._work: queue.PriorityQueue[tuple[int, int, T | None]] = queue.PriorityQueue()
        self._done: queue.PriorityQueue[tuple[int, int, T, Prepared]] = queue.PriorityQueue()
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
                outcome: Prepared = self._prepare(item)
            except BaseException as error:  # handed to the batch; the caller decides
                outcome = error
            self._done.put((rank, order, item, outcome))

    def next_batch(self, policy: BatchPolicy) -> list[tuple[T, Prepared]]:
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
        self._model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if compile_model else model
        )

    @torch.inference_mode()
    def __call__(self, inputs: list[np.ndarray]) -> list[float]:
        if not inputs:
            return []
        host = torch.from_numpy(np.stack(inputs)[:, None])  # (B, 1, H, W) float32
        if self._cuda:
            batch = host.pin_memory().to(self.device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self._model(batch)
        else:
            logits = self._model(host)
        return [float(p) for p in torch.sigmoid(logits.float()).cpu()]
