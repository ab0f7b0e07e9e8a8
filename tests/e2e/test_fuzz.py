"""Schemathesis fuzzes every operation of the OpenAPI schema: no 5xx, and every answer matches the schema."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.dispatch import get_dispatcher
from service.main import create_app
from tests.helpers import redis_server, reset_service_caches

app = create_app()  # requests read the database and dataset settings per test (service_env below)
app.dependency_overrides[get_dispatcher] = lambda: lambda job_id: True
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(autouse=True)
def _service(service_env, redis_url, monkeypatch):
    # A real broker, so that a 503 from /readyz would be a real failure, not the test's missing Redis.
    monkeypatch.setenv("CAPE_BROKER_URL", redis_url)
    reset_service_caches()
    yield


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_holds_up_to_fuzzing(case):
    case.call_and_validate(checks=CHECKS)
