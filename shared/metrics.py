"""Prometheus metrics, defined once so every service names and labels them alike.

Two kinds:
- per process: HTTP requests and their latency (each web service), recorded as they happen;
- of the pipeline, read from the sources of truth when scraped: queue depth per queue (Redis),
  images by status, failures by code, and the worker's forward passes (their duration and
  batch size, one `inference_batches` row per forward pass, written in the batch's own
  transaction). Reading them at scrape time gives the same figures on every service and
  needs no coordination between worker processes (a Celery prefork pool's children cannot
  share in-memory counters).
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import Image, ImageStatus, InferenceBatch, Prediction
from shared.deliveries import delivery_counts
from shared.drift import latest_drift
from shared.queue import Queue

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FORWARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class HttpMetrics:
    """Request count and latency of one web service, by route template (never the raw path:
    ids would make a series per batch)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "screening_http_requests",
            "HTTP requests handled, by route template, method and status",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "screening_http_request_duration_seconds",
            "HTTP request latency, by route template and method",
            ["service", "method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


def _histogram(
    name: str, documentation: str, values: list[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    counts = [sum(1 for v in values if v <= bound) for bound in buckets]
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=[
            *((str(b), c) for b, c in zip(buckets, counts, strict=True)),
            ("+Inf", len(values)),
        ],
        sum_value=sum(values),
    )


class PipelineCollector(Collector):
    """Queue depth, images by status, failures by code, forward-pass time and batch size."""

    def __init__(self, settings: Settings, recent_batches: int = 10_000) -> None:
        self.settings = settings
        self.recent_batches = recent_batches

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        depth = GaugeMetricFamily(
            "screening_queue_depth", "Tasks waiting in each queue", labels=["queue"]
        )
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2)
        try:
            for queue in Queue:
                depth.add_metric([queue.value], float(client.llen(queue.value)))
        except redis.RedisError:
            pass  # a scrape during a Redis outage reports no depth rather than failing
        finally:
            client.close()
        yield depth

        with session_scope(self.settings.database_url) as session:
            by_status = dict(
                session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
            )
            failures = session.execute(
                select(Image.error_code, func.count())
                .where(Image.status == ImageStatus.FAILED)
                .group_by(Image.error_code)
            ).all()
            batches = session.execute(
                select(InferenceBatch.images, InferenceBatch.forward_seconds)
                .order_by(InferenceBatch.id.desc())
                .limit(self.recent_batches)
            ).all()
            forward_passes = session.scalar(select(func.count()).select_from(InferenceBatch))
            deliveries = delivery_counts(session)
            drift = latest_drift(session)
            warning_code = func.unnest(Prediction.warnings).label("code")
            input_warnings = session.execute(
                select(warning_code, func.count()).group_by(warning_code)
            ).all()

        images = GaugeMetricFamily(
            "screening_images", "Images by status (all tenants)", labels=["status"]
        )
        for status in ImageStatus:
            images.add_metric([status.value], float(by_status.get(status, 0)))
        yield images
        screened = CounterMetricFamily("screening_images_screened", "Images screened (done)")
        screened.add_metric([], float(by_status.get(ImageStatus.DONE, 0)))
        yield screened
        failed = CounterMetricFamily(
            "screening_image_failures", "Images that failed, by error code", labels=["code"]
        )
        for code, count in failures:
            failed.add_metric([code or "unknown"], float(count))
        yield failed
        exported = GaugeMetricFamily(
            "screening_dicom_deliveries",
            "Exams' DICOM results to the sites' destinations, by status (dead: every attempt "
            "failed)",
            labels=["status"],
        )
        for delivery_status, count in deliveries.items():
            exported.add_metric([delivery_status], float(count))
        yield exported
        warned = CounterMetricFamily(
            "screening_input_warnings",
            "Predictions that carry a warning, by code (input_unlike_training_data: the image "
            "looks unlike the model's training inputs)",
            labels=["code"],
        )
        for code, count in input_warnings:
            warned.add_metric([code], float(count))
        yield warned
        psi = GaugeMetricFamily(
            "screening_score_drift_psi",
            "Population stability index of each tenant's latest week of exam scores against "
            "the screening version's reference (shared/drift.py)",
            labels=["tenant", "model"],
        )
        alarm = GaugeMetricFamily(
            "screening_score_drift_alarm",
            "1 when that week's index passes drift_psi_threshold on enough exams",
            labels=["tenant", "model"],
        )
        exams = GaugeMetricFamily(
            "screening_score_drift_exams", "Exams in that week", labels=["tenant", "model"]
        )
        for tenant, model, week in drift:
            labels = [tenant, model]
            if week.psi is not None:
                psi.add_metric(labels, week.psi)
            alarm.add_metric(labels, float(week.alarm))
            exams.add_metric(labels, float(week.exams))
        yield psi
        yield alarm
        yield exams
        passes = CounterMetricFamily("screening_forward_passes", "Batched forward passes run")
        passes.add_metric([], float(forward_passes or 0))
        yield passes
        yield _histogram(
            "screening_inference_seconds",
            f"Forward-pass time per batch (the last {self.recent_batches} batches)",
            [float(seconds) for _, seconds in batches],
            FORWARD_BUCKETS,
        )
        yield _histogram(
            "screening_inference_batch_size",
            f"Images per forward pass (the last {self.recent_batches} batches)",
            [float(size) for size, _ in batches],
            BATCH_SIZE_BUCKETS,
        )
