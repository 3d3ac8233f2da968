"""The demo gateway forwarding to the fake upstream through ``quotas.llm``: streams too, and
the ladder serving below a model the provider refused."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from quotas import services
from tests.llm.conftest import chat

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_stream_through_the_upstream_ends_with_its_usage_and_is_settled_by_it(
    user, fresh_upstream, settings, provider
):
    settings.GATEWAY = {**settings.GATEWAY, "UPSTREAM_URL": fresh_upstream.url,
                        "UPSTREAM_PROVIDER": provider}  # fmt: skip
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    response = api.post("/v1/chat/completions", json.dumps(chat(stream=True)),
                        content_type="application/json")  # fmt: skip
    assert response.status_code == 200 and response["X-Quota-Rung"] == "preferred"
    events = b"".join(response.streaming_content).decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    last = json.loads(events[-3].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert services.budget_for(user)["used"] == last["usage"]["total_tokens"]
    assert services.budget_for(user)["reserved"] == 0


@pytest.mark.parametrize("fallback_models", [["gpt-4o-mini"], []])
def test_a_lower_rung_serving_refunds_the_throttles_reservation(
    fallback_models, one_request_per_model, make_plan, make_user, settings, queued_jobs
):
    # The provider refuses the requested model before it is sent (its one request of the
    # minute is spent): the throttle's reservation for it is given back, and only what
    # served is charged (the fallback's usage; a deferred job: nothing yet).
    settings.GATEWAY = {**settings.GATEWAY, "UPSTREAM_URL": one_request_per_model.url,
                        "UPSTREAM_PROVIDER": f"gw-{uuid.uuid4().hex[:8]}"}  # fmt: skip
    plan = make_plan(
        tokens_per_hour=100_000,
        fallback_models=fallback_models,
        serve_from_cache=False,
        defer_when_refused=True,
    )
    user = make_user(plan=plan)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    body = json.dumps(chat(stream=True))
    first = api.post("/v1/chat/completions", body, content_type="application/json")
    first_usage = _usage_of(first)
    degraded = api.post(
        "/v1/chat/completions", body, content_type="application/json", HTTP_X_QUOTA_DEGRADE="allow"
    )
    if fallback_models:
        assert degraded.status_code == 200 and degraded["X-Quota-Rung"] == "fallback"
        charged = first_usage + _usage_of(degraded)
    else:
        assert degraded.status_code == 202 and degraded["X-Quota-Rung"] == "deferred"
        assert len(queued_jobs) == 1
        charged = first_usage
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (charged, 0, 0)


def _usage_of(response: Any) -> int:
    events = b"".join(response.streaming_content).decode().split("\n\n")
    return int(json.loads(events[-3].removeprefix("data: "))["usage"]["total_tokens"])
