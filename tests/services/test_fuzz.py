"""Schemathesis fuzzes both services' OpenAPI schemas against the real servers.

Every generated request (valid and invalid bodies, parameters and uploads, with a valid API
key) must get a response that is not a 5xx and that matches the schema declared for its
status, including the error shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.ingest import app as ingest_module
from services.results import app as results_module
from shared.config import Settings
from shared.db.base import session_factory
from tests.factories import make_batch, make_image, make_tenant
from tests.infra import Infra, drop_bucket, fresh_settings

CASES_PER_OPERATION = 30
tried: Counter[str] = Counter()

# Built with default settings (no connection is made); bound to the test servers below.
INGEST_APP = ingest_module.create_app(Settings(env="test"))
RESULTS_APP = results_module.create_app(Settings(env="test"))
ingest_schema = schemathesis.openapi.from_asgi("/openapi.json", INGEST_APP)
results_schema = schemathesis.openapi.from_asgi("/openapi.json", RESULTS_APP)
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
AUTH = "Authorization"
FUZZ = settings(
    max_examples=CASES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def api_key(infra: Infra) -> Iterator[str]:
    fuzz_settings = fresh_settings(infra)
    ingest_module.bind(INGEST_APP, fuzz_settings)
    results_module.bind(RESULTS_APP, fuzz_settings)
    with session_factory(fuzz_settings.database_url)() as session:
        tenant, key = make_tenant(session)
        make_image(session, make_batch(session, tenant))  # something real to find
    yield key
    drop_bucket(fuzz_settings)


@ingest_schema.parametrize()
@FUZZ
def test_ingest_never_errors_and_matches_its_schema(case: Any, api_key: str) -> None:
    tried["ingest"] += 1
    case.call_and_validate(headers={AUTH: f"Bearer {api_key}"}, checks=CHECKS)


@results_schema.parametrize()
@FUZZ
def test_results_never_errors_and_matches_its_schema(case: Any, api_key: str) -> None:
    tried["results"] += 1
    case.call_and_validate(headers={AUTH: f"Bearer {api_key}"}, checks=CHECKS)


def test_fuzzing_tried_enough_cases(
    record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    record_property("fuzz_cases", dict(tried))
    with capsys.disabled():
        print(f"\nfuzzing tried {sum(tried.values())} cases: {dict(tried)}")
    assert tried["ingest"] >= 50
    assert tried["results"] >= 50
