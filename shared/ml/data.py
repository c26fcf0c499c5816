"""Training data that need not fit in memory: a split is its examples' labels and lesion boxes
(small) and a function that prepares any one example's model input on demand (from the object
store, through a cache bounded in bytes); batches are read a bounded number of steps ahead.

An epoch's plan is drawn from (seed, epoch) alone and deals whole patients to the ranks of a
distributed run: the global batches are the same for one process or many, every rank sees
patients no other rank sees in that epoch, and a resumed run draws the plan again exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.ml.config import Example

Box = tuple[float, float, float, float]


class InputCache:
    """Prepared model inputs by key, least recently used first out, never over `max_bytes`
    (an input larger than the whole cache is not kept). Thread-safe: loader threads fill it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            previous = self._items.pop(key, None)
            if previous is not None:
                self.bytes -= previous.nbytes
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)


class RecentRecords:
    """Small records by key, least recently used first out, at most `max_items` of them.
    Thread-safe."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Scanned:
    """What a first pass over an image leaves for training: its lesion box in input pixels
    and its input statistics (the pixels themselves go to the cache, or are prepared again
    when used)."""

    box: tuple[float, float, float, float] | None
    statistics: np.ndarray


def dense_target(
    example: Example, lesion_box: Box | None, grid: tuple[int, int], stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position targets (2, h, w) for the two outputs' maps, and which of the two are
    known (2,). A normal image is negative everywhere for both; a benign one is negative
    everywhere for malignancy; a labelled box marks its lesion's positions positive. A
    lesion without a box leaves that output's map unsupervised."""
    target = np.zeros((2, *grid), dtype=np.float32)
    known = supervised_maps(example, lesion_box)
    if example.lesion and lesion_box is not None:
        left, top, right, bottom = lesion_box
        x0, y0 = int(left // stride), int(top // stride)
        region = (
            slice(y0, max(y0 + 1, int(np.ceil(bottom / stride)))),
            slice(x0, max(x0 + 1, int(np.ceil(right / stride)))),
        )
        target[1][region] = 1.0
        if example.malignant:
            target[0][region] = 1.0
    return target, known


def supervised_maps(example: Example, lesion_box: Box | None) -> np.ndarray:
    """Which of the two outputs' maps (malignancy, any lesion) an example supervises (2,):
    both everywhere-negative for a normal image, malignancy for a benign one, and a lesion's
    own maps where its box says where it is."""
    boxed = example.lesion and lesion_box is not None
    return np.array([not example.malignant or boxed, not example.lesion or boxed], dtype=bool)


@dataclass
class TrainingSplit:
    """A split: its examples, their lesion boxes in input pixels, and `fetch(i)`, example i's
    model input, float16 (height, width) — from memory, or prepared on demand.

    `targets` (N, 2): malignant, and any lesion (the auxiliary output); `dense_known` (N, 2):
    which outputs' per-position maps each example supervises. `statistics` (N, k): each
    input's statistics where the trainer measured them (the training split's become the
    version's input reference)."""

    examples: list[Example]
    boxes: list[Box | None]
    fetch: Callable[[int], np.ndarray]
    input_shape: tuple[int, int]
    stride: int
    statistics: np.ndarray | None = None
    loader_threads: int = 2
    read_ahead: int = 2  # batches prepared ahead of the one being used
    targets: torch.Tensor = field(init=False)
    dense_known: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.targets = torch.tensor(
            [[float(e.malignant), float(e.lesion)] for e in self.examples]
        ).reshape(-1, 2)
        # Labels and boxes alone: no per-position map is built for this.
        known = [supervised_maps(e, b) for e, b in zip(self.examples, self.boxes, strict=True)]
        self.dense_known = torch.from_numpy(np.stack(known)) if known else torch.zeros(0, 2)

    @classmethod
    def in_memory(
        cls,
        examples: list[Example],
        arrays: Sequence[np.ndarray],
        boxes: list[Box | None],
        *,
        stride: int,
    ) -> TrainingSplit:
        held = [np.asarray(a, dtype=np.float16) for a in arrays]
        shape = held[0].shape if held else (0, 0)
        return cls(examples, boxes, held.__getitem__, (shape[0], shape[1]), stride)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def malignant(self) -> torch.Tensor:
        return self.targets[:, 0]

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_shape[0] // self.stride, self.input_shape[1] // self.stride)

    def dense_example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return dense_target(self.examples[index], self.boxes[index], self.grid, self.stride)

    def inputs(self, indices: Sequence[int]) -> torch.Tensor:
        """Float16 (n, height, width)."""
        if not indices:
            return torch.zeros(0, *self.input_shape, dtype=torch.float16)
        return torch.from_numpy(np.stack([self.fetch(i) for i in indices]))

    def dense(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position targets (n, 2, h, w) and which are known (n, 2)."""
        targets = [self.dense_example(i)[0] for i in indices]
        if not targets:
            return torch.zeros(0, 2, *self.grid), torch.zeros(0, 2, dtype=torch.bool)
        return torch.from_numpy(np.stack(targets)), self.dense_known[list(indices)]

    def dense_positive_weight(self) -> torch.Tensor:
        """Known negative over known positive positions, per output (1, 2, 1, 1): positions
        inside lesion boxes are rare, so they are weighted up. Summed example by example, so
        the split's maps are never all in memory."""
        positives = torch.zeros(2, dtype=torch.float64)
        total = torch.zeros(2, dtype=torch.float64)
        cells = self.grid[0] * self.grid[1]
        for index in range(len(self.examples)):
            target, known = self.dense_example(index)
            known_t = torch.from_numpy(known.astype(np.float64))
            positives += torch.from_numpy(target.sum((1, 2)).astype(np.float64)) * known_t
            total += known_t * cells
        positives, total = positives.clamp(min=1.0), total.clamp(min=1.0)
        return ((total - positives) / positives).float().view(1, 2, 1, 1)

    def stream(self, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Each batch's inputs in order, prepared by loader threads at most `read_ahead`
        batches ahead: memory holds a few batches, not the split."""
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=max(1, self.loader_threads)) as pool:
            pending: list[Future[torch.Tensor]] = []
            ahead = iter(batches)

            def submit_next() -> None:
                batch = next(ahead, None)
                if batch is not None:
                    # A batch's images one by one in one thread; the other loader threads
                    # prepare the batches after it.
                    pending.append(pool.submit(self.inputs, list(batch)))

            for _ in range(1 + max(0, self.read_ahead)):
                submit_next()
            while pending:
                inputs = pending.pop(0).result()
                submit_next()
                yield inputs

    def in_batches(self, batch_size: int) -> list[list[int]]:
        return [
            list(range(start, min(start + batch_size, len(self))))
            for start in range(0, len(self), batch_size)
        ]


@dataclass(frozen=True)
class Step:
    """One optimiser step of an epoch: each rank's examples (indices into the split)."""

    ranks: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.ranks)


def epoch_plan(
    examples: Sequence[Example], *, seed: int, epoch: int, batch_size: int, world_size: int
) -> list[Step]:
    """The epoch's steps: patients in a seeded order, packed whole into global batches of at
    most `batch_size` images, each batch's patients dealt to the rank holding the fewest
    images so far. The global batches do not depend on `world_size`. A step that would give
    a rank fewer than two images is left out (batch norm needs two), on every rank alike."""
    by_patient: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_patient.setdefault(example.patient_key, []).append(index)
    patients = sorted(by_patient)
    generator = torch.Generator().manual_seed(seed * 10_009 + epoch)
    order = [patients[int(i)] for i in torch.randperm(len(patients), generator=generator)]
    batches: list[list[list[int]]] = [[]]
    filled = 0
    for patient in order:
        # A patient with more images than a batch holds (many priors) is split across steps.
        for start in range(0, len(by_patient[patient]), batch_size):
            images = by_patient[patient][start : start + batch_size]
            if filled + len(images) > batch_size and batches[-1]:
                batches.append([])
                filled = 0
            batches[-1].append(images)
            filled += len(images)
    steps = []
    for batch in batches:
        ranks: list[list[int]] = [[] for _ in range(world_size)]
        for images in batch:
            min(ranks, key=len).extend(images)
        if all(len(r) >= 2 for r in ranks):
            steps.append(Step(tuple(tuple(r) for r in ranks)))
    return steps


def sample_generator(seed: int, epoch: int, example_index: int) -> torch.Generator:
    """The random draws of one example's augmentation in one epoch: the same whichever rank
    or batch the example lands in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + example_index)
