"""`make bench-model`: train a model through the API and measure it on exams it never saw.

1. Generate `--train-exams` synthetic exams (seed `--train-seed`) and a fresh test set of
   `--test-exams` (seed `--test-seed`, never used in training), at the generator's defaults,
   both in the demo's mix of vendor encodings (`--encodings`).
2. Start the local stack and do what `screening train` does: upload the training folder as a
   training batch, POST /v1/training-runs, follow the run until it finishes. `train_seconds`
   runs from the POST to the run's completion (loading, every epoch, evaluation, registry).
3. Load the registered model version from the registry and score the fresh set: exam-level
   AUC with a 95% bootstrap interval.
4. Score the same fresh set with the non-learned baseline (shared/ml/baseline.py).
5. Before 2, time training steps on the first 192 training images (bench/training_scaling.py):
   `train_images_per_s` on one process, and `train_scaling_2proc`, two gloo processes of one
   torch thread each over one process of one thread.
6. Write `bench/model.json` and print it. `--export DIR` also writes the model version
   (checkpoint and version.json) to DIR: that is how models/screening-synthetic was made.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_and_print
from bench.throughput import device_name
from devstack.synth import LABEL_FIELDS, generate_exams, variant_mix
from shared.db.models import Laterality, View
from shared.imaging.decode import decode_image
from shared.imaging.preprocess import Preprocess
from shared.ml.baseline import brightest_blob_score
from shared.ml.evaluation import ScoredView, bootstrap_auc_interval, exam_outcomes
from shared.ml.model import ScreeningNet
from shared.scores import roc_auc

EXAMS_PER_CHUNK = 50


def _generate_chunk(job: tuple[Path, int, int, int, str]) -> None:
    folder, seed, first, count, encodings = job
    generate_exams(
        folder, exams=count, seed=seed, first_index=first, variants=variant_mix(encodings)
    )


def generate(folder: Path, *, exams: int, seed: int, processes: int, encodings: str) -> None:
    """`generate_exams(folder, exams, seed)` in parallel chunks: the same files and labels."""
    chunks = [
        (folder / f"part{first:05d}", seed, first, min(EXAMS_PER_CHUNK, exams - first), encodings)
        for first in range(0, exams, EXAMS_PER_CHUNK)
    ]
    with ProcessPoolExecutor(max_workers=processes) as pool:
        list(pool.map(_generate_chunk, chunks))
    rows: list[dict[str, str]] = []
    for part, *_ in chunks:
        with open(part / "labels.csv", newline="") as handle:
            rows.extend(csv.DictReader(handle))
        for path in part.glob("*.dcm"):
            path.rename(folder / path.name)
        shutil.rmtree(part)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _labelled_inputs(folder: Path, height: int, width: int) -> list[tuple[dict[str, str], Any]]:
    preprocess = Preprocess(height, width)
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    inputs = []
    for row in rows:
        pixels = decode_image(
            (folder / row["file"]).read_bytes(), "application/dicom", max_pixels=10**8
        )
        inputs.append((row, preprocess(pixels, Laterality(row["laterality"]))))
    return inputs


def _statistics_job(job: tuple[str, str, int, int]) -> np.ndarray:
    path, laterality, height, width = job
    pixels = decode_image(Path(path).read_bytes(), "application/dicom", max_pixels=10**8)
    return Preprocess(height, width).prepare(pixels, Laterality(laterality))[2]


def folder_statistics(folder: Path, height: int, width: int, processes: int) -> np.ndarray:
    """The input statistics (shared/ml/input_reference.py) of every image in `folder`."""
    with open(folder / "labels.csv", newline="") as handle:
        jobs = [
            (str(folder / row["file"]), row["laterality"], height, width)
            for row in csv.DictReader(handle)
        ]
    # Spawned, not forked: the statistics run torch ops, and a child forked from a process
    # whose torch thread pool has run waits forever on that pool's locks.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=spawn) as pool:
        return np.stack(list(pool.map(_statistics_job, jobs, chunksize=8)))


def add_reference(directory: Path, args: argparse.Namespace) -> None:
    """Write the input reference of an exported version made before versions had one: the
    statistics of the first `--reference-exams` exams of its training seed (the same images
    the run trained on: each exam depends only on the seed and its number)."""
    from shared.ml.checkpoint import load_checkpoint
    from shared.ml.input_reference import fit_reference

    record = json.loads((directory / "version.json").read_text())
    config = load_checkpoint(
        (directory / "checkpoint.pt").read_bytes(), device=torch.device("cpu")
    ).config
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as data:
        folder = Path(data) / "train"
        generate(
            folder,
            exams=args.reference_exams,
            seed=record["bench"]["train_seed"],
            processes=args.processes,
            encodings=record["bench"]["encodings"],
        )
        statistics = folder_statistics(
            folder, config.input_height, config.input_width, args.processes
        )
    reference = fit_reference(statistics)
    assert reference is not None
    record["input_reference"] = reference.to_dict()
    record["input_reference_source"] = (
        f"exams 0-{args.reference_exams - 1} of training seed {record['bench']['train_seed']} "
        f"({len(statistics)} images), bench/model.py --add-reference"
    )
    (directory / "version.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"input reference of {len(statistics)} images, threshold {reference.threshold:.2f}")


def add_score_reference(directory: Path, args: argparse.Namespace) -> None:
    """Write the drift reference (shared/drift.py) of an exported version made before
    versions had one: its exam scores on the bench's fresh test set (`--test-exams` exams of
    `--test-seed`, never trained on), scored as the worker scores them."""
    from shared.drift import fit_score_reference
    from shared.ml.checkpoint import load_checkpoint

    record = json.loads((directory / "version.json").read_text())
    model = load_checkpoint((directory / "checkpoint.pt").read_bytes(), device=torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench-score-reference-") as data:
        folder = Path(data) / "test"
        generate(
            folder,
            exams=args.test_exams,
            seed=args.test_seed,
            processes=args.processes,
            encodings=record["bench"]["encodings"],
        )
        inputs = _labelled_inputs(folder, model.config.input_height, model.config.input_width)
        outcomes = exam_outcomes(score_model(model, inputs))
    source = (
        f"{len(outcomes)} fresh exams of test seed {args.test_seed} "
        f"({record['bench']['encodings']} encodings), bench/model.py --add-score-reference"
    )
    reference = fit_score_reference([o.score for o in outcomes], source=source)
    assert reference is not None
    record["score_reference"] = reference.to_dict()
    (directory / "version.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"score reference of {reference.exams} exams: edges {reference.edges}")


def _view(row: dict[str, str], score: float) -> ScoredView:
    return ScoredView(
        row["study"],
        Laterality(row["laterality"]),
        View(row["view"]),
        score,
        row["label"] == "malignant",
    )


def exam_auc(views: Sequence[ScoredView], *, seed: int) -> tuple[float, list[float]]:
    outcomes = exam_outcomes(views)
    scores = [o.score for o in outcomes]
    labels = [o.malignant for o in outcomes]
    low, high = bootstrap_auc_interval(scores, labels, seed=seed)
    return roc_auc(scores, labels), [low, high]


def score_model(model: ScreeningNet, inputs: list[tuple[dict[str, str], Any]]) -> list[ScoredView]:
    model.eval()
    views = []
    with torch.inference_mode():
        for start in range(0, len(inputs), 32):
            chunk = inputs[start : start + 32]
            batch = torch.from_numpy(np.stack([x for _, x in chunk])[:, None])
            for (row, _), p in zip(chunk, torch.sigmoid(model(batch)).tolist(), strict=True):
                views.append(_view(row, p))
    return views


def score_baseline(inputs: list[tuple[dict[str, str], Any]]) -> list[ScoredView]:
    return [_view(row, brightest_blob_score(x)) for row, x in inputs]


def train_through_api(
    args: argparse.Namespace, train_dir: Path
) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(the finished run, its model's checkpoint, its registry row as JSON)."""
    from devstack.stack import down, up
    from mammoscreen_client import Client, submit_training_folder
    from shared.config import settings_from_environ
    from shared.db.base import session_scope
    from shared.db.models import ModelVersion
    from shared.storage import ObjectStore

    stack_dir = Path(tempfile.mkdtemp(prefix="bench-model-stack-"))
    state = up(stack_dir, environ=dict(os.environ))
    try:
        settings = settings_from_environ(state.service_env)
        hyperparameters: dict[str, Any] = json.loads(args.hyperparameters)
        with Client.from_env(state.env, timeout=600) as client:
            print(f"uploading {train_dir} as a training batch ...", flush=True)
            accepted = submit_training_folder(
                client,
                train_dir,
                name=args.name,
                seed=args.seed,
                hyperparameters=hyperparameters,
            )
            submitted = time.monotonic()
            print(f"training run {accepted['id']}: {json.dumps(accepted['split_sizes'])}")

            def progress(run: dict[str, Any]) -> None:
                if run["curve"]:
                    point = run["curve"][-1]
                    print(
                        f"  epoch {point['epoch']}: loss {point['train_loss']:.4f}, "
                        f"validation exam AUC {point['validation_auc'] or 0:.3f} "
                        f"({point['seconds']:.0f}s)",
                        flush=True,
                    )

            run = client.wait_training(
                accepted["id"], timeout=args.timeout, poll=5, on_progress=progress
            )
            run["train_seconds"] = time.monotonic() - submitted
        if run["status"] != "completed":
            raise SystemExit(f"training failed: {run['error_code']}: {run['error_message']}")
        with session_scope(settings.database_url) as session:
            version = session.get_one(ModelVersion, run["model_version"]["id"])
            checkpoint = ObjectStore(settings).get_bytes(version.checkpoint_key)
            registry_row = {
                "name": version.name,
                "recall_threshold": version.recall_threshold,
                "calibration": version.calibration,
                "metrics": version.metrics,
                "model_card": version.model_card,
                "input_reference": version.input_reference,
                "score_reference": version.score_reference,
            }
        return run, checkpoint, registry_row
    finally:
        down(stack_dir)


def export(
    directory: Path, checkpoint: bytes, registry_row: dict[str, Any], figures: dict[str, Any]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "checkpoint.pt").write_bytes(checkpoint)
    record = {
        **registry_row,
        "reproduce": "make bench-model  (bench/model.py --export models/screening-synthetic)",
        "bench": figures,
    }
    (directory / "version.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-exams", type=int, default=800)
    parser.add_argument("--test-exams", type=int, default=200)
    parser.add_argument("--train-seed", type=int, default=11)
    parser.add_argument("--test-seed", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed")
    parser.add_argument("--name", default="bench-model")
    parser.add_argument(
        "--hyperparameters",
        default=json.dumps({"time_budget_s": 1020, "init_from": "none", "folds": 1}),
        help="JSON object for POST /v1/training-runs (defaults: the API's)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--encodings",
        choices=["plain", "demo", "all"],
        default="demo",
        help="vendor encodings mixed into both sets (demo: MONOCHROME1, JPEG 2000, grey "
        "background with a burnt-in label and a SIGMOID window), as `make demo` sends",
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=Path("bench/model.json"))
    parser.add_argument("--export", type=Path, default=None, help="write the model version here")
    parser.add_argument(
        "--add-reference",
        type=Path,
        default=None,
        help="only add the input reference to an exported version made without one",
    )
    parser.add_argument("--reference-exams", type=int, default=300)
    parser.add_argument(
        "--add-score-reference",
        type=Path,
        default=None,
        help="only add the drift reference (exam scores on the fresh test set) to an "
        "exported version made without one",
    )
    args = parser.parse_args(argv)
    if args.add_reference is not None:
        add_reference(args.add_reference, args)
        return 0
    if args.add_score_reference is not None:
        add_score_reference(args.add_score_reference, args)
        return 0
    if args.train_seed == args.test_seed:
        parser.error("the test set must come from a seed not used in training")

    with tempfile.TemporaryDirectory(prefix="bench-model-data-") as data:
        train_dir, test_dir = Path(data) / "train", Path(data) / "test"
        started = time.monotonic()
        for folder, exams, seed in (
            (train_dir, args.train_exams, args.train_seed),
            (test_dir, args.test_exams, args.test_seed),
        ):
            generate(
                folder, exams=exams, seed=seed, processes=args.processes, encodings=args.encodings
            )
        print(
            f"generated {args.train_exams} + {args.test_exams} exams in "
            f"{time.monotonic() - started:.0f}s",
            flush=True,
        )
        from bench.training_scaling import measure
        from shared.ml.config import TrainingConfig

        print("training throughput: one process, then two gloo processes ...", flush=True)
        throughput = measure(train_dir, TrainingConfig.from_dict(json.loads(args.hyperparameters)))
        print(json.dumps(throughput), flush=True)
        run, checkpoint, registry_row = train_through_api(args, train_dir)

        from shared.ml.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, device=torch.device("cpu"))
        config = model.config
        inputs = _labelled_inputs(test_dir, config.input_height, config.input_width)
        model_auc, model_ci = exam_auc(score_model(model, inputs), seed=args.test_seed)
        baseline_auc, baseline_ci = exam_auc(score_baseline(inputs), seed=args.test_seed)

    figures: dict[str, Any] = {
        "model_exam_auc": model_auc,
        "model_exam_auc_ci": model_ci,
        "baseline_auc": baseline_auc,
        "baseline_auc_ci": baseline_ci,
        "train_seconds": run["train_seconds"],
        **throughput,
        "exams_train": args.train_exams,
        "exams_test": args.test_exams,
        "epochs_trained": run["evaluation"]["epochs_trained"],
        "best_epoch": run["evaluation"]["best_epoch"],
        "run_test_split_exam_auc": run["evaluation"]["test"]["exam_auc"],
        "recall_threshold": run["evaluation"]["recall_threshold"],
        "model_version": run["model_version"]["name"],
        "encodings": args.encodings,
        "train_seed": args.train_seed,
        "test_seed": args.test_seed,
        "input_size": [config.input_height, config.input_width],
        "device": device_name(torch.device("cpu")),
        "torch_version": torch.__version__,
        "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    write_and_print(figures, args.out)
    if args.export is not None:
        export(args.export, checkpoint, registry_row, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
