"""The benchmark harness runs end to end and reports every figure. It times nothing here:
speed is measured by `make bench`, never asserted in a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.throughput import UPLOAD_ROUNDS, main

STACK_KEYS = {
    "model_images_per_s",
    "pipeline_images_per_s",
    "naive_images_per_s",
    "pipeline_to_model",
    "batched_to_naive",
    "upload_mb_per_s",
    "s3_put_mb_per_s",
    "upload_to_s3_put",
    "dicom_store_mb_per_s",
    "dicom_store_to_upload",
    "urgent_latency_s",
    "idle_latency_s",
    "urgent_to_idle",
    "device",
    "torch_version",
    "batch_size",
    "pipeline_to_model_ceiling",
    "results_p99_ms",
    "status_p99_ms",
    "results_requests_per_s",
    "export_rows_per_s",
    "longpoll_idle_db_cpu_fraction",
    "recovery_s",
    "redis_recovery_s",
}
CPU_PHASES = {"model", "pipeline", "upload", "dicom_store", "s3_put", "s3_get", "prepare"}
PREPARE_SYNTAXES = {"ExplicitVRLittleEndian", "JPEG2000Lossless"}


def _assert_prepare_costs(results: dict[str, dict[str, float]]) -> None:
    """Each stage's cost per image, for each transfer syntax."""
    for key in ("prepare_cpu_ms_per_image", "prepare_device_ms_per_image"):
        assert set(results[key]) == PREPARE_SYNTAXES, key
        assert all(ms > 0 for ms in results[key].values()), key


pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_stack_benchmark_produces_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack's leases and sweeps short, so the recovery phase takes seconds here.
    monkeypatch.setenv("SCREENING_LEASE_S", "2")
    monkeypatch.setenv("SCREENING_SWEEP_INTERVAL_S", "0.5")
    out = tmp_path / "results.json"
    small = ["--height", "256", "--width", "208", "--model-seconds", "0.5"]
    scale = ["--scale-images", "1200", "--scale-pollers", "4", "--scale-seconds", "3"]
    scale += ["--scale-warmup-s", "1"]
    scale += ["--scale-long-pollers", "10", "--scale-long-poll-seconds", "3"]
    assert (
        main(
            [
                "--images",
                "8",
                "--bulk",
                "8",
                "--bulk-queued",
                "40",
                *small,
                *scale,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert STACK_KEYS - set(results) == set()
    # Idle long polls may cost Postgres less than one 10 ms CPU tick in these 3 s: 0 is a
    # measurement there, not a missing figure.
    lowest = {k: 0 if k == "longpoll_idle_db_cpu_fraction" else 1e-12 for k in STACK_KEYS}
    figures = {k: results[k] for k in STACK_KEYS if k not in ("device", "torch_version")}
    wrong = {
        k: n for k, n in figures.items() if not (isinstance(n, int | float) and n >= lowest[k])
    }
    assert wrong == {}
    # Every phase is reported. CPU time comes in 10 ms ticks, and a phase over 8 small images
    # may take less than one in a process, so single phases are only checked for the model
    # (it runs for half a second) and the services' work over the whole run must show.
    # (tests/bench/test_cpu.py checks that the attribution is right.)
    assert set(results["cpu_ms_per_image"]) == CPU_PHASES
    assert all(v >= 0 for v in results["cpu_ms_per_image"].values())
    assert results["cpu_ms_per_image"]["model"] > 0
    phases = results["cpu_by_phase"]
    assert set(phases) == CPU_PHASES
    for service in ("worker", "ingest", "gateway", "s3"):
        assert sum(phase["by_process"][service] for phase in phases.values()) > 0, service
    assert 0 < results["pipeline_to_model_ceiling"] <= 1
    # Upload and straight put alternated in rounds; the figure is the ratio of the totals.
    rounds = results["upload_to_s3_put_rounds"]
    assert len(rounds) == UPLOAD_ROUNDS
    assert all(r > 0 for r in rounds)
    assert min(rounds) - 0.001 <= results["upload_to_s3_put"] <= max(rounds) + 0.001
    # Results at scale: every request answered (no 5xx, no 429), the long polls all 304.
    assert set(results["results_http_statuses"]) <= {"200", "304"}
    assert set(results["results_latency_ms"]) == {
        "status",
        "status_if_none_match",
        "results",
        "exams",
    }
    assert set(results["longpoll_http_statuses"]) == {"304"}
    # The warm-up's answers are reported apart from the measured window's.
    assert results["results_warmup_s"] == 1
    assert {"results_warmup_p99_ms", "status_warmup_p99_ms"} <= set(results)
    # The machine's wake-up delay measured beside them (10 ms apart over 4 s: hundreds).
    wakeups = results["results_machine_wakeup_us"]
    assert wakeups["round_trips"] > 50
    assert 0 < wakeups["p50"] <= wakeups["p99"] <= wakeups["max"]
    _assert_prepare_costs(results)
    plans = (tmp_path / "results_query_plans.txt").read_text()
    assert {"== status", "== results", "== exams"} <= set(plans.splitlines())


def test_local_benchmark_produces_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "local.json"
    small = ["--height", "256", "--width", "208", "--model-seconds", "0.5"]
    assert main(["--local", "--images", "8", *small, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    local = ("local_pipeline_images_per_s", "naive_local_images_per_s", "local_worker_images_per_s")
    for key in ("model_images_per_s", *local):
        assert results[key] > 0
    _assert_prepare_costs(results)
