"""schemathesis against both published descriptions: the fleet API (`/api/schema/`, as a staff
user) and the OpenAI surface (`/v1/openapi.json`). Valid and invalid examples, a bounded number
per operation so it fits `make test`: no answer may be a 5xx, and every 4xx must have the
documented error shape."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.factories import make_api_key, make_staff_user

pytestmark = [pytest.mark.django_db(transaction=True)]

EXAMPLES = 50
# The same examples every run, so a red CI run is reproducible; FUZZ_RANDOM=1 draws new ones
# (run it a few times after changing an endpoint).
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"


@schemathesis.check
def refusals_in_the_documented_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx body is the API's error shape: OpenAI's `{"error": {...}}` under /v1, DRF's
    object of messages (`{"detail": ...}` or one per field) under /api."""
    if not 400 <= response.status_code < 500:
        return None
    body = json.loads(response.content)
    if case.path.startswith("/v1"):
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), f"not OpenAI's error shape: {body!r}"
        assert {"message", "type", "param", "code"} <= set(error), body
        assert isinstance(error["message"], str), body
        assert error["message"], body
    else:
        assert isinstance(body, dict | list), f"not DRF's error shape: {body!r}"
        assert body, body
    return True


def fuzz(schema: Any, headers: dict[str, str]) -> list[str]:
    """Every operation, positive and negative examples; what failed, one line each."""
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the description lists no operation"
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=strategy)
        def check(case: Any) -> None:
            case.call_and_validate(
                headers=headers, checks=[not_a_server_error, refusals_in_the_documented_shape]
            )

        try:
            check()
        except Exception as exc:  # hypothesis re-raises the smallest failing example
            failures.append(f"{operation.label}: {str(exc)[:2000]}")
    return failures


def test_the_fleet_api_never_answers_5xx_and_refuses_in_its_shape(
    live_server: Any, settings: Any
) -> None:
    # Basic auth checks the password on every request: a fast hash keeps the run short.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    make_staff_user("fuzzer")
    basic = base64.b64encode(b"fuzzer:correct horse battery staple").decode()
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/")
    failures = fuzz(schema, {"Authorization": f"Basic {basic}"})
    assert not failures, "\n\n".join(failures)


def test_the_openai_surface_never_answers_5xx_and_refuses_in_its_shape(live_server: Any) -> None:
    _, raw_key = make_api_key("fuzzer")
    schema = schemathesis.openapi.from_url(f"{live_server.url}/v1/openapi.json")
    failures = fuzz(schema, {"Authorization": f"Bearer {raw_key}"})
    assert not failures, "\n\n".join(failures)
