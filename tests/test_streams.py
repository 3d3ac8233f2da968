"""Metered streams in trouble: malformed events, Redis gone before the stream ends, and a
settle that raises. The client always gets the whole stream; usage is never lost."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.test import APIClient

from quotas import ledger, services
from quotas.core.tokens import encoding_for_model
from quotas.models import UsageRecord
from quotas.signals import usage_settled
from tests.enforced_urls import MALFORMED_EVENTS, USAGE
from tests.support import RedisProxy

from .test_enforcement_http import BODY, ESTIMATE

# A closed stream ends the request, and Django then closes the database connection: these
# tests run outside a test transaction so the connection simply reopens.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.enforced_urls")]

PROMPT = ESTIMATE - BODY["max_tokens"]


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))


@pytest.fixture
def client(user: Any) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def used(user: Any) -> int:
    return services.budget_for(user)["used"]


def test_malformed_events_pass_through_and_only_well_formed_text_is_charged(client, user):
    response = client.post("/malformed-stream/", BODY, format="json")
    assert b"".join(response.streaming_content) == b"".join(MALFORMED_EVENTS)
    response.close()
    # No usable usage block (its figures are impossible): the prompt plus the text produced,
    # which is "hello world" (one event split across two chunks, one without a space).
    completion = len(encoding_for_model("gpt-4").encode("hello world"))
    assert used(user) == PROMPT + completion
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (
        PROMPT,
        completion,
        "settled",
    )


def test_a_stream_whose_redis_goes_away_before_it_ends_is_still_recorded(
    client, user, proxied_redis: RedisProxy, quota_config
):
    response = client.post("/stream/", {**BODY, "stream_usage": True}, format="json")
    content = iter(response.streaming_content)
    first = next(content)
    proxied_redis.cut()  # Redis is unreachable from here on
    rest = list(content)
    response.close()  # the settle fails to reach Redis; the ledger still gets the usage
    assert b"".join([first, *rest]).endswith(b"data: [DONE]\n\n")
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (11, 29, "settled")

    quota_config(CACHE_ALIAS="default")  # the same Redis, reachable again
    assert used(user) == ESTIMATE  # Redis never heard of the settle: the estimate stands
    [outcome] = ledger.audit_windows()  # the audit replays it from the ledger
    assert outcome.replayed == 1
    assert used(user) == USAGE["total_tokens"] == row.actual_tokens


@pytest.fixture
def failing_receiver() -> Iterator[None]:
    """A host's ``usage_settled`` receiver that raises (Django's ``send`` propagates it)."""

    def receiver(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("the host's receiver failed")

    usage_settled.connect(receiver, weak=False)
    yield
    usage_settled.disconnect(receiver)


def test_a_stream_whose_settle_raises_still_reaches_the_client(
    client, user, failing_receiver, caplog
):
    with caplog.at_level(logging.ERROR, logger="quotas"):
        response = client.post("/stream/", {**BODY, "stream_usage": True}, format="json")
        body = b"".join(response.streaming_content)
        response.close()
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 5
    assert "could not settle stream" in caplog.text
    # The settle got as far as Redis and the ledger before the receiver raised.
    assert used(user) == USAGE["total_tokens"]
    assert UsageRecord.objects.get().actual_tokens == USAGE["total_tokens"]
