"""Streamed training data: the byte-bounded cache, read-ahead, epoch plans for several ranks,
and the update of an accumulated or mixed-precision step."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch

from shared.db.models import Laterality, TrainingLabel, View
from shared.ml.config import Example, TrainingConfig
from shared.ml.data import InputCache, TrainingSplit, epoch_plan
from shared.ml.training import Trainer

TINY = TrainingConfig(
    epochs=2,
    batch_size=8,
    input_height=64,
    input_width=64,
    stem_channels=4,
    stage_channels=(4, 8, 8, 8),
)
STRIDE = 16


def _examples(patients: int, images_each: int = 4, prefix: str = "patient") -> list[Example]:
    labels = [TrainingLabel.MALIGNANT, TrainingLabel.BENIGN, TrainingLabel.NORMAL]
    return [
        Example(
            uuid.uuid4(),
            f"{prefix}{p}",
            f"{prefix}-study{p}",
            Laterality.LEFT if i % 2 else Laterality.RIGHT,
            View.CC if i < 2 else View.MLO,
            labels[p % 3],
        )
        for p in range(patients)
        for i in range(images_each)
    ]


def test_the_cache_never_holds_more_than_its_bytes_and_drops_the_least_recently_used() -> None:
    cache = InputCache(max_bytes=3 * 1000)
    arrays = {k: np.zeros(500, dtype=np.float16) for k in "abcdefg"}  # 1000 bytes each
    for key in "abc":
        cache.put(key, arrays[key])
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", arrays["d"])
    assert cache.bytes <= 3000
    assert cache.get("b") is None  # the least recently used went first
    assert cache.get("a") is not None
    cache.put("huge", np.zeros(5000, dtype=np.float16))  # larger than the whole cache
    assert cache.get("huge") is None
    assert cache.bytes <= 3000

    def fill(offset: int) -> None:
        for n in range(200):
            cache.put((offset, n), np.zeros(100 + n, dtype=np.float16))

    threads = [threading.Thread(target=fill, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0 < cache.bytes <= 3000


def test_streamed_batches_come_in_order_with_a_bounded_read_ahead() -> None:
    examples = _examples(10)
    fetched: list[int] = []

    def fetch(index: int) -> np.ndarray:
        fetched.append(index)
        return np.full((64, 64), index, dtype=np.float16)

    split = TrainingSplit(examples, [None] * len(examples), fetch, (64, 64), STRIDE, read_ahead=1)
    batches = split.in_batches(8)
    seen = []
    for number, inputs in enumerate(split.stream(batches)):
        seen.append(inputs[:, 0, 0].int().tolist())
        # While batch n is used, at most batches n+1 (read ahead) and n+2 (being started)
        # have been fetched.
        assert max(fetched) < 8 * (number + 3)
    assert seen == batches


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_epoch_plan_deals_each_patient_to_one_rank_with_the_same_global_batches(
    world_size: int,
) -> None:
    examples = _examples(40, images_each=4) + _examples(7, images_each=2, prefix="single")
    one = epoch_plan(examples, seed=3, epoch=1, batch_size=16, world_size=1)
    many = epoch_plan(examples, seed=3, epoch=1, batch_size=16, world_size=world_size)
    # The global batches do not depend on how many processes share them (but for a last,
    # smaller batch that would leave a rank under two images, dropped)...
    whole = [sorted(s.ranks[0]) for s in one]
    shared = [sorted(i for r in s.ranks for i in r) for s in many]
    assert shared == whole[: len(shared)]
    assert len(whole) - len(shared) <= 1
    assert all(s.size <= 16 for s in many)
    trained = [i for s in many for r in s.ranks for i in r]
    assert len(trained) == len(set(trained)) >= len(examples) - 16
    # ... and within an epoch no patient is seen by two ranks.
    for rank in range(world_size):
        mine = {examples[i].patient_key for s in many for i in s.ranks[rank]}
        others = {
            examples[i].patient_key
            for s in many
            for r, share in enumerate(s.ranks)
            if r != rank
            for i in share
        }
        assert mine
        assert not mine & others
    # Balanced: no rank gets more than one patient's images more than another in a step.
    assert all(max(map(len, s.ranks)) - min(map(len, s.ranks)) <= 4 for s in many)
    # Seeded by (seed, epoch) alone: drawn again, the same; another epoch, another order.
    assert many == epoch_plan(examples, seed=3, epoch=1, batch_size=16, world_size=world_size)
    assert many != epoch_plan(examples, seed=3, epoch=2, batch_size=16, world_size=world_size)


def _split(seed: int, n: int = 32) -> TrainingSplit:
    rng = np.random.default_rng(seed)
    examples = _examples(n // 4)
    arrays, boxes = [], []
    for example in examples:
        image = rng.normal(0, 1, (64, 64)).astype(np.float32)
        box = None
        if example.lesion:
            y, x = rng.integers(8, 48, 2)
            image[y : y + 8, x : x + 8] += 4.0
            box = (float(x), float(y), float(x + 8), float(y + 8))
        arrays.append(image)
        boxes.append(box)
    return TrainingSplit.in_memory(examples, arrays, boxes, stride=STRIDE)


def _gradients(config: TrainingConfig) -> dict[str, torch.Tensor]:
    trainer = Trainer(config, seed=4, train=_split(1), validation=None)
    # Batch norm on its running statistics and no dropout: the step's update is then a pure
    # function of the examples, however they are grouped.
    trainer.forward.eval()
    step = epoch_plan(trainer.train.examples, seed=4, epoch=0, batch_size=16, world_size=1)[0]
    trainer._step(step, trainer.train.inputs(step.ranks[0]), epoch=0)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_makes_the_same_update_as_the_whole_batch() -> None:
    whole = _gradients(TINY)
    accumulated = _gradients(replace(TINY, accumulation_steps=4))
    assert whole.keys() == accumulated.keys()
    for name, gradient in whole.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-6)


def test_mixed_precision_is_off_on_the_cpu_unless_asked_and_trains_when_asked() -> None:
    default = Trainer(TINY, seed=1, train=_split(1), validation=_split(2, 16))
    assert (default.autocast, default.channels_last) == (False, False)
    asked = Trainer(
        replace(TINY, mixed_precision="bf16", channels_last="on"),
        seed=1,
        train=_split(1),
        validation=_split(2, 16),
    )
    assert (asked.autocast, asked.channels_last) == (True, True)
    results = [asked.run_epoch() for _ in range(2)]
    assert all(np.isfinite(r.train_loss) for r in results)
    assert results[1].train_loss < results[0].train_loss
    # bf16 arithmetic, not float32 under another name: the losses differ from float32's.
    reference = [default.run_epoch() for _ in range(2)]
    assert [r.train_loss for r in results] != [r.train_loss for r in reference]
