"""Rejected requests are not free to repeat: a known client's 400s and 413s count against
``QUOTAS["REJECTED_PER_MINUTE"]``; past it every request is a 429, refused before anything
reads its body. Through the demo gateway (Django test client, real Redis, bearer tokens)."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from quotas import services
from quotas.backends.redis import RedisWindowStore, ScriptRunner
from quotas.engine import runtime

pytestmark = pytest.mark.django_db

URL = "/v1/chat/completions"
GOOD = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10}
BAD = {"model": "gpt-4", "messages": "not a list"}
ALLOWED = 5


@pytest.fixture(autouse=True)
def allowance(quota_config):
    quota_config(REJECTED_PER_MINUTE=ALLOWED)


@pytest.fixture
def plan(make_plan):
    return make_plan(tokens_per_hour=100_000, max_tokens_per_request=2000)


def client_of(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def user(make_user, plan):
    return make_user(plan=plan)


@pytest.fixture
def client(user):
    return client_of(user)


def post(client: APIClient, body: Any) -> Any:
    return client.post(URL, body, format="json")


def assert_attempts_refusal(response: Any) -> dict:
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert (error["code"], error["type"], error["limit"]) == ("rate_limit_exceeded", "attempts", 5)
    assert 1 <= int(response["Retry-After"]) <= 61
    assert int(response["retry-after-ms"]) <= 61_000
    return error


def test_past_the_allowance_of_400s_every_request_is_a_429(client):
    for _ in range(ALLOWED):
        assert post(client, BAD).status_code == 400
    # Before: every one of these was another free 400 (and a good one was served).
    assert_attempts_refusal(post(client, BAD))
    assert_attempts_refusal(post(client, GOOD))


def test_a_client_over_its_allowance_is_refused_before_its_body_is_read(client):
    for _ in range(ALLOWED):
        post(client, BAD)
    huge = json.dumps({"model": "gpt-4", "messages": [{}] * 300_000}, separators=(",", ":"))
    with (
        mock.patch.object(services, "estimate", wraps=services.estimate) as estimate,
        mock.patch.object(ScriptRunner, "run", wraps=None) as scripts,
        mock.patch("project.gateway.views.validated_chat_request") as validate,
    ):
        response = client.generic("POST", URL, huge, content_type="application/json")
    assert_attempts_refusal(response)
    assert not estimate.called and not scripts.called and not validate.called


def test_413s_count_once_each(client):
    too_large = {**GOOD, "max_tokens": 5000}  # over the plan's per-request cap
    for _ in range(ALLOWED):
        assert post(client, too_large).status_code == 413
    assert_attempts_refusal(post(client, GOOD))


def test_every_process_refuses_the_client_through_its_reserve(client):
    for _ in range(ALLOWED):
        post(client, BAD)
    runtime._runtime.pop("blocklist")  # another process: it has learned nothing yet
    with mock.patch.object(RedisWindowStore, "reserve", wraps=services.get_store().reserve) as r:
        assert_attempts_refusal(post(client, GOOD))  # the reserve script refuses
        assert r.called
        calls = r.call_count
        assert_attempts_refusal(post(client, GOOD))  # then this process remembers
    assert r.call_count == calls


def test_other_clients_are_not_affected(client, make_user, plan):
    for _ in range(ALLOWED + 2):
        post(client, BAD)
    assert post(client_of(make_user(plan=plan)), GOOD).status_code == 200


def test_an_admitted_request_makes_no_extra_redis_call(client):
    assert post(client, GOOD).status_code == 200  # limits cached in Redis from here on
    with mock.patch.object(ScriptRunner, "run", autospec=True, side_effect=ScriptRunner.run) as r:
        assert post(client, GOOD).status_code == 200
    assert [call.args[1] for call in r.call_args_list] == ["reserve", "settle"]


def test_rejected_attempts_can_be_turned_off(client, quota_config):
    quota_config(REJECTED_PER_MINUTE=0)
    for _ in range(ALLOWED + 3):
        assert post(client, BAD).status_code == 400
    assert post(client, GOOD).status_code == 200


def test_a_missing_token_is_not_counted_against_anyone(client):
    anonymous = APIClient()
    for _ in range(ALLOWED + 2):
        assert post(anonymous, BAD).status_code == 401
    assert post(client, GOOD).status_code == 200


def test_views_are_recognised_as_enforced_or_not_even_when_unhashable():
    from project.gateway.views import ChatCompletionsView
    from quotas.api.views import PlanListView
    from quotas.middleware import _enforced

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, request: Any) -> None:
            return None

    assert _enforced(ChatCompletionsView.as_view())
    assert not _enforced(PlanListView.as_view())
    assert not _enforced(Unhashable())
