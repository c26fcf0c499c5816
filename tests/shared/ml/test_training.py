from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import torch

from shared.db.models import Laterality, Split, TrainingLabel, View
from shared.ml.config import (
    Example,
    TrainingConfig,
    fold_split,
    folds_for,
    split_by_patient,
    stratified_folds,
    weights_fit,
)
from shared.ml.data import TrainingSplit, dense_target
from shared.ml.training import Trainer, augment_batch

TINY = TrainingConfig(
    epochs=3,
    batch_size=8,
    input_height=64,
    input_width=64,
    stem_channels=4,
    stage_channels=(4, 8, 8, 8),
    patience=10,
)
STRIDE = 16


def _patients(n: int, malignant_every: int = 4) -> list[tuple[uuid.UUID, str, bool]]:
    images = []
    for p in range(n):
        for _ in range(4):
            images.append((uuid.uuid4(), f"patient{p}", p % malignant_every == 0))
    return images


def test_no_patient_is_in_two_splits_and_positives_reach_every_split() -> None:
    images = _patients(60)
    splits = split_by_patient(images, seed=3, validation_fraction=0.2, test_fraction=0.2)
    by_patient: dict[str, set[Split]] = {}
    for image_id, patient, _ in images:
        by_patient.setdefault(patient, set()).add(splits[image_id])
    assert all(len(s) == 1 for s in by_patient.values())
    for split in Split:
        members = [m for i, _, m in images if splits[i] == split]
        assert any(members)
        assert not all(members)
    # 15 malignant patients: 3 test, 3 validation, 9 train.
    malignant_test = {p for i, p, m in images if m and splits[i] == Split.TEST}
    assert len(malignant_test) == 3


def test_split_is_deterministic_per_seed_and_independent_of_order() -> None:
    images = _patients(40)
    first = split_by_patient(images, seed=1, validation_fraction=0.2, test_fraction=0.2)
    shuffled = split_by_patient(
        list(reversed(images)), seed=1, validation_fraction=0.2, test_fraction=0.2
    )
    other_seed = split_by_patient(images, seed=2, validation_fraction=0.2, test_fraction=0.2)
    assert first == shuffled
    assert first != other_seed


def _example(label: TrainingLabel, view: View = View.CC) -> Example:
    return Example(uuid.uuid4(), "p", "s", Laterality.LEFT, view, label)


def test_dense_targets_say_what_the_labels_know() -> None:
    grid = (4, 4)
    target, known = dense_target(_example(TrainingLabel.NORMAL), None, grid, STRIDE)
    assert known.tolist() == [True, True]
    assert target.sum() == 0
    target, known = dense_target(_example(TrainingLabel.BENIGN), None, grid, STRIDE)
    assert known.tolist() == [True, False]  # not malignant anywhere; lesion place unknown
    target, known = dense_target(_example(TrainingLabel.MALIGNANT), None, grid, STRIDE)
    assert known.tolist() == [False, False]
    box = (17.0, 33.0, 40.0, 47.0)  # cells x 1..2, y 2
    target, known = dense_target(_example(TrainingLabel.MALIGNANT), box, grid, STRIDE)
    assert known.tolist() == [True, True]
    assert np.argwhere(target[0]).tolist() == [[2, 1], [2, 2]]
    assert (target[0] == target[1]).all()


def test_augmentation_moves_the_targets_with_the_image() -> None:
    generators = [torch.Generator().manual_seed(5 + i) for i in range(8)]
    inputs = torch.zeros(8, 64, 64)
    dense = torch.zeros(8, 2, 4, 4)
    inputs[:, 16:32, 32:48] = 5.0  # cell (1, 2)
    dense[:, :, 1, 2] = 1.0
    out, out_dense = augment_batch(inputs, dense, [View.CC] * 4 + [View.MLO] * 4, generators)
    for index in range(8):
        rows, cols = torch.nonzero(out_dense[index, 0], as_tuple=True)
        cell_r, cell_c = int(rows[0]), int(cols[0])
        bright = out[index, cell_r * 16 : cell_r * 16 + 16, cell_c * 16 : cell_c * 16 + 16]
        assert bright.mean() > out[index].mean() + 1  # the lesion is where the target says
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[2], out[3])


def _tiny_split(seed: int, n: int = 32) -> TrainingSplit:
    """Images with a bright 8x8 square where malignant; boxes given."""
    rng = np.random.default_rng(seed)
    examples, arrays, boxes = [], [], []
    for index in range(n):
        label = [TrainingLabel.MALIGNANT, TrainingLabel.BENIGN, TrainingLabel.NORMAL][index % 3]
        image = rng.normal(0, 1, (64, 64)).astype(np.float32)
        box = None
        if label != TrainingLabel.NORMAL:
            y, x = rng.integers(8, 48, 2)
            image[y : y + 8, x : x + 8] += 4.0 if label == TrainingLabel.MALIGNANT else 2.0
            box = (float(x), float(y), float(x + 8), float(y + 8))
        examples.append(
            Example(uuid.uuid4(), f"p{index}", f"s{index}", Laterality.LEFT, View.CC, label)
        )
        arrays.append(image)
        boxes.append(box)
    return TrainingSplit.in_memory(examples, arrays, boxes, stride=STRIDE)


def _trainer() -> Trainer:
    return Trainer(TINY, seed=7, train=_tiny_split(1), validation=_tiny_split(2, 24))


def test_seeded_training_is_reproducible_on_cpu() -> None:
    first, second = _trainer(), _trainer()
    results = [(first.run_epoch(), second.run_epoch()) for _ in range(2)]
    for a, b in results:
        assert a.train_loss == b.train_loss
        assert a.validation_auc == b.validation_auc
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name


def test_a_resumed_run_continues_exactly_where_an_uninterrupted_one_would() -> None:
    straight = _trainer()
    straight_results = [straight.run_epoch() for _ in range(3)]
    interrupted = _trainer()
    interrupted.run_epoch()
    buffer = io.BytesIO()
    torch.save(interrupted.state(), buffer)
    del interrupted  # the worker died
    resumed = _trainer()
    resumed.restore(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.next_epoch == 1
    resumed_results = [resumed.run_epoch() for _ in range(2)]
    for a, b in zip(straight_results[1:], resumed_results, strict=True):
        assert (a.epoch, a.train_loss, a.validation_auc) == (
            b.epoch,
            b.train_loss,
            b.validation_auc,
        )
    assert resumed.finished
    assert straight.finished
    assert resumed.best_epoch == straight.best_epoch


def test_training_learns_the_tiny_task() -> None:
    trainer = Trainer(
        TrainingConfig(
            **{**TINY.to_dict(), "epochs": 8, "learning_rate": 3e-3, "stage_channels": (4, 8, 8, 8)}
        ),
        seed=3,
        train=_tiny_split(1, 96),
        validation=_tiny_split(2, 48),
    )
    while not trainer.finished:
        trainer.run_epoch()
    assert trainer.best_auc > 0.8


@pytest.mark.parametrize(("patience", "expected_max_epochs"), [(1, 6), (100, 6)])
def test_early_stopping_ends_once_validation_stops_improving(
    patience: int, expected_max_epochs: int
) -> None:
    config = TrainingConfig(**{**TINY.to_dict(), "epochs": 6, "patience": patience})
    trainer = Trainer(config, seed=1, train=_tiny_split(3), validation=_tiny_split(4, 24))
    epochs = 0
    while not trainer.finished:
        trainer.run_epoch()
        epochs += 1
    assert epochs <= expected_max_epochs
    if patience == 1:
        assert epochs == trainer.best_epoch + 2 or epochs == 6
    else:
        assert epochs == 6


def test_folds_hold_out_every_patient_once_with_positives_in_every_fold() -> None:
    images = _patients(50, malignant_every=5)  # 10 malignant patients
    fold_of = stratified_folds(images, folds=5, seed=2)
    by_patient: dict[str, set[int]] = {}
    for image_id, patient, _ in images:
        by_patient.setdefault(patient, set()).add(fold_of[image_id])
    assert all(len(f) == 1 for f in by_patient.values())
    for fold in range(5):
        roles = {fold_split(fold_of[i], fold, 5) for i, _, _ in images}
        assert roles == set(Split)
        held_out = [m for i, _, m in images if fold_split(fold_of[i], fold, 5) == Split.TEST]
        assert sum(held_out) == 2 * 4  # two malignant patients, four images each
        assert len(held_out) == 10 * 4
    assert stratified_folds(list(reversed(images)), folds=5, seed=2) == fold_of
    assert stratified_folds(images, folds=5, seed=3) != fold_of


def test_small_data_sets_default_to_folds_and_warm_start_needs_matching_layers() -> None:
    config = TrainingConfig()
    assert folds_for(config, 150) == 5
    assert folds_for(config, 400) == 1
    assert folds_for(TrainingConfig(folds=1), 20) == 1
    assert folds_for(TrainingConfig(folds=3), 1000) == 3
    ours = {
        "architecture": "screening-resnet-v1",
        "stem_channels": 16,
        "stage_channels": [16, 32, 64, 128],
        "input_height": 1024,
    }
    assert weights_fit(ours, config)  # another input size is fine
    assert not weights_fit({**ours, "stage_channels": [8, 16, 32, 64]}, config)
    assert not weights_fit({"format": "torchscript", "manifest": {}}, config)


def test_a_warm_start_keeps_the_early_layers_frozen_for_its_first_epochs() -> None:
    source = _trainer()
    source.run_epoch()
    weights = {k: v.clone() for k, v in source.model.state_dict().items()}
    config = TrainingConfig(**{**TINY.to_dict(), "freeze_epochs": 1})
    warm = Trainer(
        config, seed=7, train=_tiny_split(1), validation=_tiny_split(2, 24), init_weights=weights
    )
    assert warm.optimizer.param_groups[0]["lr"] == config.fine_tune_learning_rate
    stem_before = warm.model.stem[0].weight.detach().clone()
    head_before = warm.model.head.weight.detach().clone()
    bn_before = warm.model.stem[1].running_mean.clone()
    warm.run_epoch()
    assert torch.equal(warm.model.stem[0].weight, stem_before), "frozen in the first epoch"
    assert torch.equal(warm.model.stem[1].running_mean, bn_before), "batch-norm statistics too"
    assert not torch.equal(warm.model.head.weight, head_before)
    warm.run_epoch()
    assert not torch.equal(warm.model.stem[0].weight, stem_before), "thawed afterwards"
    cold = Trainer(config, seed=7, train=_tiny_split(1), validation=_tiny_split(2, 24))
    assert cold.optimizer.param_groups[0]["lr"] == config.learning_rate


def test_without_a_validation_split_every_epoch_is_the_best_so_far() -> None:
    config = TrainingConfig(**{**TINY.to_dict(), "epochs": 2, "patience": 1})
    trainer = Trainer(config, seed=1, train=_tiny_split(3), validation=None)
    results = [trainer.run_epoch() for _ in range(2)]
    assert [r.validation_auc for r in results] == [None, None]
    assert trainer.finished
    assert trainer.best_epoch == 1
