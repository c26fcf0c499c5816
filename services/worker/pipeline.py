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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from shared.ml.imported import ImportedModel
from shared.ml.model import ScreeningNet, heatmaps_within_scores

T = TypeVar("T")
R = TypeVar("R")
# Queue ranks: lower goes first.
STOP, URGENT, NORMAL = -1, 0, 1
# Longest the model waits for urgent images still being prepared before it screens ready
# bulk images instead (a loader stuck on a slow read must not stall the bulk lane).
URGENT_READY_WAIT_S = 2.0


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_wait_s: float


class Prefetcher(Generic[T, R]):
    """Runs `prepare` on loader threads; hands results back in batches, urgent first.

    Urgent items jump the unstarted work, and form batches of their own: while urgent items
    are outstanding, the next batch waits for them (they are next in the loaders) rather than
    starting a forward pass over ready bulk images, and holds no bulk image. So an urgent exam
    claimed while a bulk batch fills the loaders waits for the images already being prepared
    and the forward pass already running, not for everything queued ahead of it.
    """

    def __init__(self, prepare: Callable[[T], R], *, threads: int) -> None:
        self._prepare = prepare
        self._order = itertools.count()
        self._work: queue.PriorityQueue[tuple[int, int, T | None]] = queue.PriorityQueue()
        self._ready: dict[int, queue.Queue[tuple[T, R | BaseException]]] = {
            URGENT: queue.Queue(),
            NORMAL: queue.Queue(),
        }
        self._pending = {URGENT: 0, NORMAL: 0}
        self._threads = [
            threading.Thread(target=self._run, name=f"loader-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Submitted and not yet handed back by next_batch."""
        return self._pending[URGENT] + self._pending[NORMAL]

    @property
    def ready(self) -> int:
        """Prepared and waiting for a batch."""
        return self._ready[URGENT].qsize() + self._ready[NORMAL].qsize()

    def submit(self, items: Iterable[T], *, urgent: bool = False) -> None:
        rank = URGENT if urgent else NORMAL
        for item in items:
            self._pending[rank] += 1
            self._work.put((rank, next(self._order), item))

    def _run(self) -> None:
        while True:
            rank, _, item = self._work.get()
            if item is None:
                return
            try:
                outcome: R | BaseException = self._prepare(item)
            except BaseException as error:  # handed to the batch; the caller decides
                outcome = error
            self._ready[rank].put((item, outcome))

    def next_batch(self, policy: BatchPolicy) -> list[tuple[T, R | BaseException]]:
        """Block for the first ready item, then take more of its lane until the batch is
        full, the lane has nothing more outstanding, or the wait is over."""
        if self.pending == 0:
            return []
        if self._pending[URGENT]:
            try:
                first = self._ready[URGENT].get(timeout=URGENT_READY_WAIT_S)
            except queue.Empty:
                pass
            else:
                return self._fill(URGENT, first, policy)
        if self._pending[NORMAL] == 0:
            return self._fill(URGENT, self._ready[URGENT].get(), policy)
        return self._fill(NORMAL, self._ready[NORMAL].get(), policy)

    def _fill(
        self, rank: int, first: tuple[T, R | BaseException], policy: BatchPolicy
    ) -> list[tuple[T, R | BaseException]]:
        batch = [first]
        ready = self._ready[rank]
        deadline = time.monotonic() + policy.max_wait_s
        while len(batch) < policy.max_batch and len(batch) < self._pending[rank]:
            try:
                batch.append(ready.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        self._pending[rank] -= len(batch)
        return batch

    def close(self) -> None:
        """Stop the loaders; work not yet started is abandoned (its claims are released by
        the caller or expire)."""
        for _ in self._threads:
            self._work.put((STOP, next(self._order), None))
        for thread in self._threads:
            thread.join()


# A batch of model inputs: (B, 1, H, W) on any device, or B host arrays of (H, W).
Inputs = torch.Tensor | Sequence[np.ndarray]


class Predictor:
    """One forward pass per batch, set up for the device it runs on.

    CUDA: inference mode, channels-last memory, bf16 autocast, pinned host memory and a
    non-blocking copy, optionally torch.compile. CPU: float32 (autocast there is slower than
    it is worth on these convolutions); the thread count is set once per process by the
    model cache.
    """

    def __init__(
        self, model: ScreeningNet | ImportedModel, device: torch.device, *, compile_model: bool
    ) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        if self._cuda:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._raw_model = model
        self._model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if compile_model else model
        )

    def _device_batch(self, inputs: Inputs) -> torch.Tensor:
        """(B, 1, H, W) float32 on the device: a batch made there already
        (`Preprocess.make_inputs`), or host arrays sent over."""
        if isinstance(inputs, torch.Tensor):
            batch = inputs.to(self.device)
        else:
            host = torch.from_numpy(np.stack(inputs)[:, None])
            if not self._cuda:
                return host
            batch = host.pin_memory().to(self.device, non_blocking=True)
        if not self._cuda:
            return batch
        return batch.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, inputs: Inputs) -> list[float]:
        """Malignancy probabilities."""
        if len(inputs) == 0:
            return []
        batch = self._device_batch(inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._cuda):
            logits = self._model(batch)
        return [float(p) for p in torch.sigmoid(logits.float()).cpu()]

    @torch.inference_mode()
    def with_heatmaps(self, inputs: Inputs) -> tuple[list[float], np.ndarray]:
        """Probabilities and per-position malignancy probabilities (B, H/s, W/s) from the
        same forward pass (the class activation map through the sigmoid, never hotter than
        its view's probability)."""
        if len(inputs) == 0:
            return [], np.zeros((0, 0, 0), dtype=np.float32)
        batch = self._device_batch(inputs)
        assert isinstance(self._raw_model, ScreeningNet), "imported models have no heatmaps"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._cuda):
            logits, maps = self._raw_model.forward_with_heatmap(batch)
        probabilities = torch.sigmoid(logits.float())
        heatmaps = heatmaps_within_scores(probabilities, torch.sigmoid(maps.float()))
        return [float(p) for p in probabilities.cpu()], heatmaps.cpu().numpy()
