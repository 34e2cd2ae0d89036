"""Property-based fuzzing of /openapi.json with schemathesis against a running server: no 5xx,
and every answer conforms to the documented status codes, content types and schemas."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection

from serverkit import API_KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20240601,
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": 100, "mode": "all"},
    # A schema-valid body may still break a rule the schema cannot express (prompt tokens +
    # max_new_tokens within the budget, seed with best_of, ...): 422 is then the right answer.
    "checks": {"positive_data_acceptance": {"enabled": False},
               # 413: a fuzzed body bigger than --payload-limit is refused before it is read.
               "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "406",
                                                                 "413", "415", "422", "428"]}},
})


@pytest.fixture(scope="session")
def api_schema(limited_server):
    # The limited server: 64-token budget (fast answers), 8 KB payload limit, API key.
    return schemathesis.openapi.from_url(limited_server.url + "/openapi.json", headers=AUTH, config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


def rejected_in_stream(response) -> bool:
    """TGI's refusal of a request that chose to stream: 200 text/event-stream whose one event is
    ``{"error", "error_type"}``. The schema cannot say so, so it counts as a rejection here."""
    if response.status_code != 200 or not any(
            v.startswith("text/event-stream") for v in response.headers.get("content-type", [])):
        return False
    events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return len(events) == 1 and set(json.loads(events[0])) == {"error", "error_type"}


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms(case, limited_server):
    response = case.call(base_url=limited_server.url, headers=AUTH, timeout=60)
    excluded = [negative_data_rejection] if rejected_in_stream(response) else []
    case.validate_response(response, excluded_checks=excluded)
