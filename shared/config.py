"""The one settings class of the project; every process reads it from `SCREENING_*` variables."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that are fine on a laptop and fatal in production. The validator below refuses them
# whenever SCREENING_ENV is not a development or test environment.
DEV_S3_ACCESS_KEY = "screening-dev"
DEV_S3_SECRET_KEY = "screening-dev-secret"  # noqa: S105 (refused outside dev)
DEV_PATIENT_KEY_SECRET = "screening-dev-patient-key-secret"  # noqa: S105


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SCREENING_", env_ignore_empty=True, extra="ignore", frozen=True
    )

    env: Literal["dev", "test", "prod"] = "dev"

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/screening"
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint: str = "http://127.0.0.1:9000"
    s3_access_key: str = DEV_S3_ACCESS_KEY
    s3_secret_key: str = DEV_S3_SECRET_KEY
    s3_bucket: str = "screening"
    s3_region: str = "us-east-1"

    # Keyed hash for pseudonymous patient keys: the same patient always maps to the same key,
    # and nobody without this secret can test a guessed patient id against stored keys.
    patient_key_secret: str = DEV_PATIENT_KEY_SECRET

    # Where clients (CLI, demo) find the services, and the key they present.
    ingest_url: str = "http://127.0.0.1:8000"
    results_url: str = "http://127.0.0.1:8001"
    api_key: str | None = None

    # Ingest limits. Enforced while streaming, so an oversized file never lands whole.
    max_file_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_files_per_request: int = Field(default=256, gt=0)
    # Each uploaded file of a request is held in memory up to this size while the request is
    # parsed (beyond it, in a temporary file): at most max_files_per_request x this per request.
    upload_spool_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Files of one upload request stored side by side (README "Throughput").
    ingest_store_threads: int = Field(default=4, gt=0)
    # A whole request body, counted as it arrives (the transport spools uploads to disk).
    max_request_bytes: int = Field(default=4 * 1024**3, gt=0)
    # Decompression bombs: pixels an image's header may declare (a mammogram is 10-30 M).
    max_image_pixels: int = Field(default=64_000_000, gt=0)
    max_zip_entries: int = Field(default=2000, gt=0)
    max_zip_bytes: int = Field(default=4 * 1024**3, gt=0)  # total uncompressed
    max_images_per_batch: int = Field(default=100_000, gt=0)

    # Reliability (see docs/reliability.md). A worker's claim on an image lasts lease_s, and
    # the task that holds it renews it every lease_s / 4 while it works
    # (services/worker/leases.py); the sweeper (every sweep_interval_s, in each worker)
    # returns expired claims to the queue, fails an image after max_attempts claims, re-sends
    # queued work not sent or not picked up within requeue_after_s, and deletes objects left
    # without a row for orphan_grace_s. A killed worker's images are screened again within
    # about lease_s + sweep_interval_s.
    lease_s: float = Field(default=15, gt=0)
    sweep_interval_s: float = Field(default=10, gt=0)
    requeue_after_s: float = Field(default=900, gt=0)
    max_attempts: int = Field(default=5, gt=0)
    orphan_grace_s: float = Field(default=3600, ge=0)
    orphan_sweep_every: int = Field(default=360, gt=0)  # sweeps between orphan scans (1 h)

    # Requests per API key per minute, counted in Redis across every service process;
    # 0 turns the limit off. A poll of a batch's status that is conditional (If-None-Match)
    # or long (wait=N) is answered from the batch's counters, or sleeps until they change, so
    # it counts as 1/rate_limit_polls_per_request of a request (README "Polling at scale").
    rate_limit_per_minute: int = Field(default=600, ge=0)
    rate_limit_polls_per_request: int = Field(default=10, ge=1)
    # Processes the results service answers in (uvicorn workers, `python -m
    # services.results`); 0: three per core, at most 12 (services/results/__main__.py).
    results_workers: int = Field(default=0, ge=0)
    # Connections each results process keeps open to Postgres: about the requests it answers
    # at once (50 pollers on two processes: 25). Beyond them each request opened and closed
    # a connection of its own, and a Postgres backend per request cost more than the query
    # (status p99 426 -> 160 ms at 5 -> 25). Postgres's max_connections must cover
    # results_workers x (this + 10) beside the other services' 15 each.
    results_database_pool_size: int = Field(default=25, ge=1)

    # How many image ids one inference task carries (a chunk of a bulk batch).
    inference_chunk_size: int = Field(default=16, gt=0)
    # Dynamic batching (README "Throughput"): at most this many images per forward pass,
    # waiting at most this long after the first ready image for more.
    inference_batch_size: int = Field(default=4, gt=0)
    inference_max_wait_s: float = Field(default=0.05, ge=0)
    # Threads that read, decode and preprocess while the model runs.
    worker_loader_threads: int = Field(default=2, gt=0)
    # A running task claims further queued images (urgent batches first) for this long, so
    # the model stays busy across tasks; False screens only each task's own images.
    worker_claim_queued: bool = True
    worker_max_task_s: float = Field(default=30, gt=0)
    # torch.compile the model on first load (CUDA workers; slow to start).
    worker_compile: bool = False
    # "auto" picks CUDA when torch sees a GPU, else the CPU.
    worker_device: str = "auto"
    # CPU threads for torch in an inference worker. 0: one fewer than the cores (its image
    # loaders need one).
    worker_torch_threads: int = Field(default=0, ge=0)
    # CPU threads for torch in a training worker. 0: every core (shared among its ranks).
    training_torch_threads: int = Field(default=0, ge=0)
    # Training (README "Training at scale"). Processes that train one run together
    # (torch.distributed: NCCL on GPUs, gloo on the CPU); "auto" device: a GPU per process
    # when torch sees enough of them, else the CPU.
    training_processes: int = Field(default=1, ge=1, le=64)
    training_device: str = "auto"
    # Prepared inputs each training process keeps, in bytes: a data set that fits is decoded
    # once per process (and reused by the folds of a cross-validation); a larger one streams
    # from the object store every epoch. Batches prepared ahead of the one training.
    training_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    training_read_ahead: int = Field(default=2, ge=0, le=64)
    # A distributed run whose process dies restarts its processes from the last checkpoint
    # this many times before the run is left to the sweeper.
    training_max_restarts: int = Field(default=2, ge=0)
    # When set, every training process appends a line per epoch here
    # ({run id}-rank{rank}.jsonl): the epoch, its rank and process, and the image ids it
    # trained on, in order.
    training_trace_dir: str | None = None
    # The trained model kept in the repository, registered as the active one when none is
    # (models/screening-synthetic, made by `make bench-model`); "none" registers an untrained
    # one.
    shipped_model: str = "models/screening-synthetic"
    # Write a heatmap (class activation map) PNG per screened image.
    worker_heatmaps: bool = True

    # Training runs renew a heartbeat this often; a running run whose heartbeat is older than
    # training_stale_s (its worker died) is sent again by the sweeper and resumes from its
    # last checkpoint.
    training_heartbeat_s: float = Field(default=10, gt=0)
    training_stale_s: float = Field(default=120, gt=0)

    # The DICOM gateway (services/gateway): its AE title and where it listens.
    dicom_ae_title: str = Field(default="MAMMOSCREEN", min_length=1, max_length=16)
    dicom_host: str = "0.0.0.0"  # noqa: S104 (a DICOM node listens for the site's PACS)
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    # A study counts as complete this long after its last instance arrived; its batch then
    # closes. A later instance of the study goes into a follow-up batch.
    dicom_study_quiet_s: float = Field(default=30, gt=0)
    dicom_max_associations: int = Field(default=8, gt=0)
    dicom_max_pdu_bytes: int = Field(default=262_144, ge=0)  # 0: no limit
    dicom_acse_timeout_s: float = Field(default=30, gt=0)
    dicom_dimse_timeout_s: float = Field(default=60, gt=0)
    dicom_network_timeout_s: float = Field(default=60, gt=0)

    # The identity vault (shared/vault.py): keys as JSON {"key id": "base64 of 32 bytes"},
    # here or in a file (the file is read when the vault is first used); the active key seals
    # new rows (default: the only key). Without a key, nothing is sealed and exports carry
    # the de-identified UIDs.
    vault_keys: str | None = None
    vault_key_file: Path | None = None
    vault_active_key: str | None = None

    # DICOM results delivered to the site (shared/deliveries.py): attempts before a delivery
    # is dead, the first retry's delay (doubling after each failure, capped at an hour), and
    # the network timeout of one attempt.
    export_max_attempts: int = Field(default=5, gt=0)
    export_retry_base_s: float = Field(default=10, gt=0)
    export_timeout_s: float = Field(default=30, gt=0)
    # Longest one round of the exporter thread (services/worker/sweeping.py) renders and
    # delivers before it looks at its stop signal again.
    export_sweep_budget_s: float = Field(default=20, gt=0)

    # Drift (shared/drift.py): a tenant's week whose exam scores lie this far from the
    # version's reference (population stability index; 0.1-0.2 is commonly read as a shift,
    # above 0.2 as a large one) raises the alarm, once the week has this many exams: below
    # it the index's own noise passes the threshold too often (a week drawn from the
    # reference's own distribution, against a 200-exam reference: 1.2% of weeks at 100
    # exams, 0.2% at 150, 0.08% at 200). The workers recompute the current and previous week
    # this often.
    drift_psi_threshold: float = Field(default=0.2, gt=0)
    drift_min_exams: int = Field(default=150, ge=1)
    drift_interval_s: float = Field(default=600, gt=0)
    # Retention (shared/retention.py; the days are each tenant's): how often the workers purge
    # what is due.
    retention_interval_s: float = Field(default=3600, gt=0)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets_outside_development(self) -> Settings:
        if self.env in ("dev", "test"):
            return self
        placeholders = {
            "SCREENING_S3_ACCESS_KEY": self.s3_access_key == DEV_S3_ACCESS_KEY,
            "SCREENING_S3_SECRET_KEY": self.s3_secret_key == DEV_S3_SECRET_KEY,
            "SCREENING_PATIENT_KEY_SECRET": self.patient_key_secret == DEV_PATIENT_KEY_SECRET,
        }
        offending = sorted(name for name, is_placeholder in placeholders.items() if is_placeholder)
        if offending:
            raise ValueError(
                f"SCREENING_ENV={self.env} refuses development placeholder values for "
                f"{', '.join(offending)}; set real secrets"
            )
        return self

    @property
    def s3_host(self) -> str:
        """host:port of the S3 endpoint, the form the minio client takes."""
        return urlsplit(self.s3_endpoint).netloc

    @property
    def s3_secure(self) -> bool:
        return urlsplit(self.s3_endpoint).scheme == "https"


def settings_from_environ(environ: Mapping[str, str]) -> Settings:
    """Settings from a mapping of SCREENING_* variables; os.environ fills what it lacks."""
    prefix = "SCREENING_"
    values = {
        name[len(prefix) :].lower(): value
        for name, value in environ.items()
        if name.startswith(prefix) and value
    }
    return Settings.model_validate(values)


# What a process needs to reach Postgres, Redis and object storage.
CONNECTION_FIELDS = (
    "env",
    "database_url",
    "redis_url",
    "s3_endpoint",
    "s3_access_key",
    "s3_secret_key",
    "s3_bucket",
)


def settings_to_environ(settings: Settings, fields: tuple[str, ...]) -> dict[str, str]:
    """The SCREENING_* variables that reproduce these fields of `settings` in another process."""
    return {f"SCREENING_{name.upper()}": str(getattr(settings, name)) for name in fields}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, built once per process on first use."""
    return Settings()
