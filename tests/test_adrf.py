"""Async DRF (``adrf``) views under Django's ASGI request path (``AsyncClient``: the
middleware in async mode), with ``TokenQuotaThrottle`` and ``AsyncTokenQuotaThrottle``, on
the real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from quotas import services
from quotas.models import UsageRecord

from .test_enforcement_http import BODY, ESTIMATE

pytest.importorskip("adrf", reason="adrf (async DRF) is not installed")

# Async views reach the database from worker threads: no test transaction to hide rows in.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.adrf_urls")]


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))


async def _post(user: Any, url: str, body: dict[str, Any] = BODY) -> tuple[Any, bytes]:
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.post(url, body, content_type="application/json")
    if not response.streaming:
        return response, response.content
    return response, b"".join([chunk async for chunk in response.streaming_content])


post = async_to_sync(_post)


@pytest.mark.parametrize("url", ["/adrf/completion/", "/adrf/async-throttle/"])
def test_an_adrf_view_is_enforced_settled_and_refused(user, url):
    response, _ = post(user, url)
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "960"  # settled at its usage, 40
    assert services.budget_for(user)["used"] == 40
    assert UsageRecord.objects.get().actual_tokens == 40

    held = [services.reserve(user, 450) for _ in range(2)]  # 60 left: 100 no longer fits
    refused, body = post(user, url)
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert b"60 of 1000 tokens remaining" in body
    for reservation in held:
        services.refund(reservation)
    assert services.budget_for(user)["used"] == 40  # the refusal charged nothing


def test_an_adrf_view_streaming_an_async_generator_is_settled_once(user):
    response, content = post(user, "/adrf/stream/")
    assert response.status_code == 200
    assert content.endswith(b"data: [DONE]\n\n")
    assert response["X-RateLimit-Remaining"] == str(1000 - ESTIMATE)  # as of the reserve
    assert services.budget_for(user)["used"] == 40
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (11, 29, "settled")
