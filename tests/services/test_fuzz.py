"""Schemathesis fuzzes both services' OpenAPI schemas against the real servers.

Every generated request (valid and invalid bodies, parameters and uploads, with a valid API
key) must get a response that is not a 5xx and that matches the schema declared for its
status, including the error shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.pytest._test_builder import build_operation_test

from services.ingest.app import create_app as create_ingest
from services.results.app import create_app as create_results
from shared.config import Settings
from shared.db.base import session_factory
from tests.factories import make_batch, make_image, make_tenant
from tests.infra import Infra, drop_bucket, fresh_settings

CASES_PER_OPERATION = 30
# What every response must satisfy: no 5xx, a documented status, and a body and headers that
# match what the schema declares for that status. The heuristics that guess whether a
# request "should" have been accepted are left out: opaque cursors are validated by their
# content (422 invalid_cursor) and unknown query parameters are ignored on purpose.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]
FUZZ = settings(
    max_examples=CASES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_settings(infra: Infra) -> Iterator[Settings]:
    """A database, bucket and Redis db of this module's own."""
    module_settings = fresh_settings(infra)
    yield module_settings
    drop_bucket(module_settings)


@pytest.fixture(scope="module")
def api_key(fuzz_settings: Settings) -> str:
    with session_factory(fuzz_settings.database_url)() as session:
        tenant, key = make_tenant(session)
        make_image(session, make_batch(session, tenant))  # something real to find
    return key


def fuzz(app: FastAPI, api_key: str) -> Counter[str]:
    """Every operation of the app's OpenAPI schema, with valid and invalid requests drawn by
    schemathesis (up to `CASES_PER_OPERATION` random ones each, and its boundary cases),
    checked by `CHECKS`; returns the requests sent per operation. The first operation that
    fails raises, named in the error."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label

        def check(case: Any) -> None:
            sent[label] += 1  # noqa: B023 (runs within this iteration)
            case.call_and_validate(headers={"Authorization": f"Bearer {api_key}"}, checks=CHECKS)

        # The same test schemathesis' pytest plugin builds for an operation (its examples,
        # fuzzing and coverage phases), run here inside one test of ours.
        run: Callable[[], None] = build_operation_test(
            config=schema.config,
            operation=operation,
            test_func=check,
            given_kwargs={},
            feedback=FeedbackSources(),
            explicit_settings=FUZZ,
        )
        try:
            run()
        except Exception as failure:
            failure.add_note(f"while fuzzing {operation.label}")
            raise
    return sent


@pytest.mark.parametrize("service", ["ingest", "results"])
def test_a_service_never_errors_and_matches_its_schema(
    service: str, fuzz_settings: Settings, api_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    app = {"ingest": create_ingest, "results": create_results}[service](fuzz_settings)
    sent = fuzz(app, api_key)
    with capsys.disabled():
        print(f"\nfuzzing {service} tried {sum(sent.values())} cases on {len(sent)} operations")
    # Every operation was exercised: a schema that lost its operations, or strategies that
    # generate nothing, would otherwise pass by testing nothing.
    operations = len(list(app.openapi()["paths"].values()))
    assert len(sent) >= operations
    assert sum(sent.values()) >= 50 * (len(sent) - 2)  # all but the health checks
