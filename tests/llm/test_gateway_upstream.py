"""The demo gateway forwarding to the fake upstream through ``quotas.llm``: streams too."""

from __future__ import annotations

import json

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
