"""A small Python client for the ingest and results APIs."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypedDict, cast

import httpx

MEDIA_TYPES = {
    ".dcm": "application/dicom",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}


class ImageCounts(TypedDict):
    queued: int
    running: int
    done: int
    failed: int
    stored: int


class ModelVersionInfo(TypedDict):
    id: str
    name: str
    status: str
    trained: bool


class BatchStatus(TypedDict):
    """GET /v1/batches/{id}."""

    id: str
    name: str
    priority: str
    purpose: str
    status: str
    created_at: str
    closed_at: str | None
    completed_at: str | None
    callback_url: str | None
    source: str  # api, dicom (sent to the DICOM gateway) or dicomweb (STOW-RS)
    sent_by: str | None  # the sending DICOM node's AE title
    accession_key: str | None  # keyed hash of the study's accession number
    counts: ImageCounts
    total_images: int
    rejected_files: int
    model_versions: list[ModelVersionInfo]
    warnings: list[str]


class ImageResult(TypedDict):
    """One item of GET /v1/batches/{id}/results, or GET /v1/images/{id}."""

    id: str
    batch_id: str
    study_id: str
    filename: str
    media_type: str
    laterality: str | None
    view: str | None
    status: str
    attempts: int
    score: float | None
    error_code: str | None
    error_message: str | None
    model_version: ModelVersionInfo | None
    heatmap_url: str | None
    created_at: str
    finished_at: str | None


class ExamResult(TypedDict):
    """One item of GET /v1/batches/{id}/exams."""

    id: str
    study_key: str
    patient_key: str
    images: list[dict[str, Any]]
    views_present: list[str]
    missing_views: list[str]
    breasts: list[dict[str, Any]]
    exam_score: float | None
    exam_probability: float | None
    recall: str | None
    recall_threshold: float | None
    model_version: ModelVersionInfo | None


class ApiClientError(Exception):
    """The service answered with an error; `code` is its stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


RETRY_STATUSES = (429, 503)
OUTCOMES_PER_REQUEST = 10_000  # the ingest API's limit for one bulk import


class RetryTransport(httpx.HTTPTransport):
    """Retries 429 (rate limited) and 503 (a dependency is down) after the server's
    `Retry-After`, or with exponential backoff without one, up to `retries` times. Safe for
    every call here: a 429 or 503 from these services means nothing was done. Uploads retry
    too: httpx rewinds the files of a multipart body when it sends it again."""

    def __init__(self, *, retries: int, max_wait_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retries = retries
        self.max_wait_s = max_wait_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = super().handle_request(request)
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                return response
            wait = self._wait_s(response.headers.get("Retry-After"), attempt)
            response.close()
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _wait_s(self, retry_after: str | None, attempt: int) -> float:
        try:
            wait = float(retry_after) if retry_after is not None else 2.0**attempt
        except ValueError:  # an HTTP date: not sent by these services
            wait = 2.0**attempt
        return min(self.max_wait_s, max(0.0, wait))


class Client:
    """The ingest and results APIs from Python. 429 and 503 answers are retried (honouring
    `Retry-After`) up to `retries` times before they raise ApiClientError."""

    def __init__(
        self,
        *,
        ingest_url: str,
        results_url: str,
        api_key: str,
        timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        self._ingest = httpx.Client(
            base_url=ingest_url,
            headers=headers,
            timeout=timeout,
            transport=RetryTransport(retries=retries),
        )
        self._results = httpx.Client(
            base_url=results_url,
            headers=headers,
            timeout=timeout,
            transport=RetryTransport(retries=retries),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str], **options: Any) -> Client:
        """A client from SCREENING_INGEST_URL, SCREENING_RESULTS_URL and SCREENING_API_KEY."""
        return cls(
            ingest_url=env["SCREENING_INGEST_URL"],
            results_url=env["SCREENING_RESULTS_URL"],
            api_key=env["SCREENING_API_KEY"],
            **options,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close_connections()

    def close_connections(self) -> None:
        self._ingest.close()
        self._results.close()

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.is_success:
            body: dict[str, Any] = response.json()
            return body
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": response.text[:500], "detail": {}}
        raise ApiClientError(
            response.status_code,
            error.get("code", "http_error"),
            error.get("message", ""),
            error.get("detail") or {},
        )

    @classmethod
    def _bytes(cls, response: httpx.Response) -> bytes:
        if response.is_success:
            return response.content
        cls._json(response)  # raises ApiClientError with the service's code
        raise AssertionError("unreachable")

    def create_batch(
        self, name: str, *, priority: str = "normal", purpose: str = "screening"
    ) -> dict[str, Any]:
        return self._json(
            self._ingest.post(
                "/v1/batches", json={"name": name, "priority": priority, "purpose": purpose}
            )
        )

    def upload_files(
        self, batch_id: str, files: Sequence[tuple[str, Any, str]], **fields: str
    ) -> dict[str, Any]:
        """Upload open files given as (file name, a readable binary file, media type)."""
        parts = [("files", item) for item in files]
        return self._json(
            self._ingest.post(f"/v1/batches/{batch_id}/images", files=parts, data=fields)
        )

    def upload(self, batch_id: str, paths: Sequence[Path], **fields: str) -> dict[str, Any]:
        with ExitStack() as stack:
            files = [
                (
                    "files",
                    (
                        p.name,
                        stack.enter_context(open(p, "rb")),
                        MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream"),
                    ),
                )
                for p in paths
            ]
            return self._json(
                self._ingest.post(f"/v1/batches/{batch_id}/images", files=files, data=fields)
            )

    def close_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._ingest.post(f"/v1/batches/{batch_id}/close"))

    def delete_batch(self, batch_id: str) -> dict[str, Any]:
        """Erase the batch and everything in it (scope `erase`); the counts of what went."""
        return self._json(self._ingest.delete(f"/v1/batches/{batch_id}"))

    def erase_patient(self, patient_id: str) -> dict[str, Any]:
        """Erase every exam of this patient (the id as the site knows it) in this tenant
        (scope `erase`); the counts of what went, all zero when nothing was left."""
        return self._json(self._ingest.post("/v1/erasures", json={"patient_id": patient_id}))

    def record_outcome(
        self, exam_id: str, *, truth: str, breast: str, source: str, date: str
    ) -> dict[str, Any]:
        """What became of an exam (truth malignant, benign or normal; breast left, right or
        both; source biopsy, surgery, follow_up, registry or other; date YYYY-MM-DD)."""
        outcome = {"truth": truth, "breast": breast, "source": source, "date": date}
        return self._json(self._ingest.post(f"/v1/exams/{exam_id}/outcome", json=outcome))

    def import_outcomes(self, outcomes: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """Outcomes naming their exams by `exam_id` or `study_key`, all or none (at most
        OUTCOMES_PER_REQUEST); importing them again replaces them."""
        body = {"outcomes": [dict(o) for o in outcomes]}
        return self._json(self._ingest.post("/v1/outcomes", json=body))

    def outcomes(self, exam_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json(
            self._results.get(f"/v1/exams/{exam_id}/outcomes")
        )["items"]
        return items

    def evaluate(
        self,
        *,
        model_versions: Sequence[str] = (),
        batch_ids: Sequence[str] = (),
        outcomes_from: str | None = None,
        outcomes_to: str | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Queue an evaluation of model versions (none: the active one) on this tenant's exams
        with outcomes; poll it with `evaluation` or `wait_evaluation`."""
        body: dict[str, Any] = {
            "model_versions": list(model_versions),
            "batch_ids": list(batch_ids),
            "seed": seed,
        }
        if outcomes_from:
            body["outcomes_from"] = outcomes_from
        if outcomes_to:
            body["outcomes_to"] = outcomes_to
        return self._json(self._ingest.post("/v1/evaluations", json=body))

    def set_operating_point(
        self, model_version_id: str, *, evaluation_id: str, target: str, value: float
    ) -> dict[str, Any]:
        """This tenant's own recall threshold for the version, chosen on the evaluation for a
        target ("sensitivity" or "recall_rate"); the answer shows what it gives there."""
        body = {"evaluation_id": evaluation_id, "target": target, "value": value}
        return self._json(
            self._ingest.put(f"/v1/models/{model_version_id}/operating-point", json=body)
        )

    def drift(self, *, weeks: int = 12) -> dict[str, Any]:
        """This tenant's weekly drift figures, newest first (GET /v1/drift): each week's exam
        scores against the model's reference (`psi`, `alarm`) and its inputs' summary."""
        return self._json(self._results.get("/v1/drift", params={"weeks": weeks}))

    def evaluation(self, evaluation_id: str) -> dict[str, Any]:
        return self._json(self._results.get(f"/v1/evaluations/{evaluation_id}"))

    def wait_evaluation(
        self, evaluation_id: str, *, timeout: float = 3600, poll_s: float = 2.0
    ) -> dict[str, Any]:
        """The evaluation once `completed` or `failed`; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            evaluation = self.evaluation(evaluation_id)
            if evaluation["status"] in ("completed", "failed"):
                return evaluation
            if time.monotonic() > deadline:
                raise TimeoutError(f"evaluation {evaluation_id} still {evaluation['status']}")
            time.sleep(poll_s)

    def batch(self, batch_id: str) -> BatchStatus:
        return cast(BatchStatus, self._json(self._results.get(f"/v1/batches/{batch_id}")))

    def batches(self, *, limit: int = 50) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json(
            self._results.get("/v1/batches", params={"limit": limit})
        )["items"]
        return items

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float,
        poll: float = 10.0,
        on_change: Callable[[BatchStatus], None] | None = None,
    ) -> BatchStatus:
        """Wait until the batch completes; raises TimeoutError with its last counts.

        Long polls: each request waits up to `poll` seconds on the server for the batch to
        change (ETag / If-None-Match), so progress arrives as it happens at one request per
        change, not one per second.
        """
        deadline = time.monotonic() + timeout
        status = self.batch(batch_id)
        etag: str | None = None
        if on_change is not None:
            on_change(status)
        while status["status"] != "completed":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"batch {batch_id} not completed after {timeout:.0f}s: "
                    f"{status['status']} {status['counts']}"
                )
            response = self._results.get(
                f"/v1/batches/{batch_id}",
                params={"wait": round(min(poll, remaining), 2)},
                headers={"If-None-Match": etag} if etag else {},
            )
            if response.status_code != 304:
                status = cast(BatchStatus, self._json(response))
                etag = response.headers.get("ETag")
                if on_change is not None:
                    on_change(status)
        return status

    def _follow_cursors(self, path: str, page_size: int) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = self._json(self._results.get(path, params=params))
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def iter_results(self, batch_id: str, *, page_size: int = 100) -> Iterator[ImageResult]:
        """Every image's result, in upload order."""
        for item in self._follow_cursors(f"/v1/batches/{batch_id}/results", page_size):
            yield cast(ImageResult, item)

    def iter_exams(self, batch_id: str, *, page_size: int = 100) -> Iterator[ExamResult]:
        """Every exam of the batch with breast and exam scores and the recall recommendation."""
        for item in self._follow_cursors(f"/v1/batches/{batch_id}/exams", page_size):
            yield cast(ExamResult, item)

    def export(self, batch_id: str, *, format: str = "csv") -> Iterator[str]:
        """The whole batch's results as CSV or JSON text, streamed in chunks."""
        with self._results.stream(
            "GET", f"/v1/batches/{batch_id}/export", params={"format": format}
        ) as response:
            if not response.is_success:
                response.read()
                self._json(response)  # raises ApiClientError with the service's code
            yield from response.iter_text()

    def deliveries(self, batch_id: str) -> list[dict[str, Any]]:
        """Where each exam's DICOM results went (pending, delivered, dead) and the last answer."""
        items: list[dict[str, Any]] = self._json(
            self._results.get(f"/v1/batches/{batch_id}/deliveries")
        )["items"]
        return items

    def retry_delivery(self, delivery_id: str) -> dict[str, Any]:
        """Send a dead delivery again."""
        return self._json(self._ingest.post(f"/v1/deliveries/{delivery_id}/retry"))

    def dicom_report(self, exam_id: str) -> bytes:
        """The exam's DICOM Structured Report (identified only for an export_identified key)."""
        return self._bytes(self._results.get(f"/v1/exams/{exam_id}/report.dcm"))

    def dicom_heatmap(self, image_id: str) -> bytes:
        """The image's heatmap as a DICOM Segmentation."""
        return self._bytes(self._results.get(f"/v1/images/{image_id}/heatmap.dcm"))

    def create_training_run(
        self,
        name: str,
        *,
        labels: Sequence[Mapping[str, Any]],
        batch_id: str | None = None,
        seed: int = 0,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Queue a training run; `labels` are {"file" or "image_id", "label", optional "box"}."""
        body = {
            "name": name,
            "seed": seed,
            "dataset": {"batch_id": batch_id, "labels": list(labels)},
            "hyperparameters": dict(hyperparameters or {}),
        }
        return self._json(self._ingest.post("/v1/training-runs", json=body))

    def training_run(self, run_id: str) -> dict[str, Any]:
        return self._json(self._results.get(f"/v1/training-runs/{run_id}"))

    def wait_training(
        self,
        run_id: str,
        *,
        timeout: float,
        poll: float = 2.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the run completes or fails; `on_progress` sees every new state."""
        deadline = time.monotonic() + timeout
        seen: tuple[str, int] | None = None
        while True:
            run = self.training_run(run_id)
            if on_progress is not None and (run["status"], run["epochs_done"]) != seen:
                seen = (run["status"], run["epochs_done"])
                on_progress(run)
            if run["status"] in ("completed", "failed"):
                return run
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"training run {run_id} still {run['status']} after {timeout:.0f}s "
                    f"({run['epochs_done']} epochs done)"
                )
            time.sleep(poll)

    def models(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._json(self._results.get("/v1/models"))["items"]
        return items


def read_labels_csv(path: Path) -> list[dict[str, Any]]:
    """Labels from a CSV with `file` and `label` (malignant, benign or normal) columns, and
    optionally a lesion box `box_x0,box_y0,box_x1,box_y1` in the image's pixels (the
    synthetic generator's labels.csv has all of them)."""
    labels = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            entry: dict[str, Any] = {"file": row["file"], "label": row["label"]}
            corners = [row.get(f"box_{c}") for c in ("x0", "y0", "x1", "y1")]
            if all(corners):
                entry["box"] = [int(float(c)) for c in corners if c]
            labels.append(entry)
    return labels


def submit_training_folder(
    client: Client,
    folder: Path,
    *,
    name: str,
    seed: int,
    hyperparameters: Mapping[str, Any] | None = None,
    files_per_request: int = 32,
    on_upload: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Upload a labelled folder (images + labels.csv) as a training batch, then queue a
    training run on it. Returns the accepted run."""
    labels = read_labels_csv(folder / "labels.csv")
    batch = client.create_batch(f"training data: {name}", purpose="training")
    paths = [folder / entry["file"] for entry in labels]
    for start in range(0, len(paths), files_per_request):
        chunk = paths[start : start + files_per_request]
        result = client.upload(batch["id"], chunk)
        if result["rejected"]:
            first = result["rejected"][0]
            raise ApiClientError(
                422,
                "training_file_rejected",
                f"{len(result['rejected'])} training files were refused (first: "
                f"{first['filename']}: {first['code']}); fix or leave them out of labels.csv",
                {"rejected": result["rejected"]},
            )
        if on_upload is not None:
            on_upload(start + len(chunk), len(paths))
    client.close_batch(batch["id"])
    return client.create_training_run(
        name, labels=labels, batch_id=batch["id"], seed=seed, hyperparameters=hyperparameters
    )
