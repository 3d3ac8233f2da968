"""The demo gateway's ``POST /v1/chat/completions`` through HTTP (Django test client, real
Redis, real bearer-token authentication): OpenAI's response shapes, the fake model's true usage,
and the quota figures a client sees in headers and in ``/quotas/me/``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from quotas.core.tokens import count_chat_tokens, encoding_for_model
from tests.support import redis_ms, refusing_port
from tests.test_enforcement_http import assert_reset_matches

pytestmark = pytest.mark.django_db

URL = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me about token quotas."},
]
BODY = {"model": "gpt-4", "messages": MESSAGES}
ANSWER_TOKENS = 300  # settings.GATEWAY["FAKE_ANSWER_TOKENS"]
PROMPT_TOKENS = count_chat_tokens(encoding_for_model("gpt-4"), MESSAGES)  # as the estimator


@pytest.fixture
def plan(make_plan):
    return make_plan(slug="gw", tokens_per_hour=5000, max_tokens_per_request=2000)


@pytest.fixture
def user(make_user, plan):
    return make_user(plan=plan)


def bearer_client(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def client(user):
    return bearer_client(user)


def chat(client: APIClient, **fields: Any) -> Any:
    return client.post(URL, {**BODY, **fields}, format="json")


def sse_events(response: Any) -> list[Any]:
    """The ``data:`` payloads of a streamed response, JSON-decoded except ``[DONE]``."""
    text = b"".join(response.streaming_content).decode()
    events = [block for block in text.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    payloads = [event.removeprefix("data: ") for event in events]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def _gateway_settings(**overrides: Any) -> dict[str, Any]:
    return {**settings.GATEWAY, **overrides}


def budget(client: APIClient) -> dict[str, Any]:
    response = client.get("/quotas/me/")
    assert response.status_code == 200
    return response.json()


# -- the answer -----------------------------------------------------------------------------
def test_a_completion_is_an_openai_chat_completion_with_true_usage(client):
    response = chat(client)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", "gpt-4")
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert (choice["index"], choice["finish_reason"]) == (0, "stop")
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"]) > 1000  # about 300 tokens of English
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": ANSWER_TOKENS,
        "total_tokens": PROMPT_TOKENS + ANSWER_TOKENS,
    }


def test_the_answer_is_deterministic(client):
    first, second = chat(client).json(), chat(client).json()
    assert first["choices"] == second["choices"]
    assert first["id"] != second["id"]


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    body = chat(client, max_tokens=5).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    full = chat(client).json()["choices"][0]["message"]["content"]
    assert full.startswith(body["choices"][0]["message"]["content"])


def test_max_completion_tokens_wins_over_max_tokens(client):
    body = chat(client, max_tokens=50, max_completion_tokens=7).json()
    assert body["usage"]["completion_tokens"] == 7


def test_a_limit_above_the_natural_answer_ends_with_stop(client):
    body = chat(client, max_tokens=ANSWER_TOKENS).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == ANSWER_TOKENS


def test_a_stream_sends_chunks_then_usage_then_done(client):
    response = chat(client, stream=True, max_tokens=40)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert all(c["object"] == "chat.completion.chunk" for c in [*chunks, usage_chunk])
    assert len({c["id"] for c in [*chunks, usage_chunk]}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(chunks) >= 10  # a few tokens per chunk
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 40,
        "total_tokens": PROMPT_TOKENS + 40,
    }
    assert text == chat(client, max_tokens=40).json()["choices"][0]["message"]["content"]


# -- the budget ----------------------------------------------------------------------------
def test_the_budget_is_charged_the_actual_usage_not_the_estimate(client, redis_client):
    started = redis_ms(redis_client)
    response = chat(client, max_tokens=1000)  # reserves prompt + 1000, uses prompt + 300
    assert response.status_code == 200
    actual = PROMPT_TOKENS + ANSWER_TOKENS
    me = budget(client)
    assert (me["limit"], me["used"], me["remaining"]) == (5000, actual, 5000 - actual)
    assert response["X-RateLimit-Remaining"] == str(me["remaining"])
    assert response["X-RateLimit-Limit"] == response["x-ratelimit-limit-tokens"] == "5000"
    assert response["x-ratelimit-remaining-tokens"] == str(me["remaining"])
    assert_reset_matches(
        response["X-RateLimit-Reset"], me["reset_seconds"], redis_ms(redis_client) - started
    )
    assert response["RateLimit"].startswith(f'"tokens-hour";r={me["remaining"]};')
    assert response["RateLimit-Policy"] == '"tokens-hour";q=5000;w=3600'


def test_a_stream_is_charged_its_actual_usage_once_it_ends(client):
    events = sse_events(chat(client, stream=True, max_tokens=1000))
    assert events[-2]["usage"]["completion_tokens"] == ANSWER_TOKENS
    assert budget(client)["used"] == PROMPT_TOKENS + ANSWER_TOKENS


@pytest.mark.django_db(transaction=True)  # closing a response closes the DB connection
def test_a_client_that_leaves_mid_stream_is_charged_what_it_was_sent(client):
    response = chat(client, stream=True, max_tokens=1000)
    content = iter(response.streaming_content)
    received = [json.loads(next(content).decode().removeprefix("data: ")) for _ in range(4)]
    response.close()  # what the WSGI server does when the client goes away
    text = "".join(c["choices"][0]["delta"]["content"] for c in received)
    sent_tokens = len(encoding_for_model("gpt-4").encode(text))
    assert 0 < sent_tokens < ANSWER_TOKENS
    assert budget(client)["used"] == PROMPT_TOKENS + sent_tokens


def test_over_budget_is_a_429_whose_figures_match_the_budget(make_user, plan):
    client = bearer_client(make_user(plan=plan, override=1500))
    served = [chat(client, max_tokens=400) for _ in range(3)]  # 3 x (prompt + 300) used
    assert [r.status_code for r in served] == [200, 200, 200]
    response = chat(client, max_tokens=600)
    assert response.status_code == 429
    me = budget(client)
    assert me["used"] == 3 * (PROMPT_TOKENS + ANSWER_TOKENS)
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert (error["limit"], error["remaining"]) == (1500, me["remaining"])
    assert error["requested"] == PROMPT_TOKENS + 600
    assert response["X-RateLimit-Remaining"] == str(me["remaining"])
    assert response["x-ratelimit-remaining-tokens"] == str(me["remaining"])
    assert int(response["Retry-After"]) == error["retry_after_seconds"] >= 1
    assert 0 < int(response["retry-after-ms"]) <= int(response["Retry-After"]) * 1000
    # A smaller request still fits what is left.
    assert chat(client, max_tokens=50).status_code == 200


def test_a_request_over_the_per_request_cap_is_a_413_without_retry_after(client):
    response = chat(client, max_tokens=2001)
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["limit"]) == ("request_too_large", 2000)
    assert error["requested"] == PROMPT_TOKENS + 2001
    assert "Retry-After" not in response
    assert "retry-after-ms" not in response
    assert budget(client)["used"] == 0


def test_a_refused_request_costs_nothing(client):
    response = chat(client, n=2)  # valid JSON the gateway refuses: never reserved
    assert response.status_code == 400
    assert budget(client)["used"] == 0


def test_quotas_can_be_switched_off_for_the_benchmark(make_user, plan):
    client = bearer_client(make_user(plan=plan, override=100))
    with override_settings(GATEWAY={**_gateway_settings(), "ENFORCE_QUOTAS": False}):
        response = chat(client)
    assert response.status_code == 200
    assert "X-RateLimit-Limit" not in response
    assert budget(client)["used"] == 0
    assert chat(client).status_code == 413  # enforced again: 300+ tokens never fit in 100


# -- who may call and see what --------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Token abc", "Bearer"])
def test_a_missing_or_bad_token_is_a_401(authorization, user):
    client = APIClient()
    if authorization:
        client.credentials(HTTP_AUTHORIZATION=authorization)
    response = chat(client)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


def test_a_user_cannot_read_another_users_budget_but_staff_can(make_user, user, client):
    from django.contrib.auth.models import Permission

    other = make_user()
    assert client.get(f"/quotas/users/{other.pk}/").status_code == 403
    chat(client)
    staff_user = make_user(is_staff=True)
    staff_user.user_permissions.add(Permission.objects.get(codename="view_userquota"))
    response = bearer_client(staff_user).get(f"/quotas/users/{user.pk}/")
    assert response.status_code == 200
    assert response.json()["used"] == PROMPT_TOKENS + ANSWER_TOKENS
    superuser = bearer_client(make_user(is_staff=True, is_superuser=True))
    assert superuser.get(f"/quotas/users/{user.pk}/").status_code == 200


def test_staff_without_the_admins_permission_cannot_read_a_budget(make_user, user):
    # The admin refuses a staff account without quotas.view_userquota; so does the API.
    staff = bearer_client(make_user(is_staff=True))
    response = staff.get(f"/quotas/users/{user.pk}/")
    assert response.status_code == 403
    assert "quotas.view_userquota" in response.json()["detail"]


# -- the upstream API -------------------------------------------------------------------------
UPSTREAM_ANSWER = {
    "id": "chatcmpl-upstream",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23},
}


class FakeUpstream(BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, dict[str, str], Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, dict(self.headers), body))
        payload = UPSTREAM_ANSWER if self.status == 200 else {"error": {"message": "Overloaded"}}
        raw = json.dumps(payload).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    FakeUpstream.seen, FakeUpstream.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_an_upstream_answer_is_returned_and_settled_from_its_usage(client, upstream):
    gateway = _gateway_settings(UPSTREAM_URL=upstream, UPSTREAM_API_KEY="sk-up")
    with override_settings(GATEWAY=gateway):
        response = chat(client, max_tokens=500, temperature=0.2, extra_field="kept")
    assert response.status_code == 200
    # The upstream's answer as it sent it, and which rung of the quota ladder served it.
    assert response.json() == {**UPSTREAM_ANSWER, "quota_rung": "preferred"}
    assert response["X-Quota-Rung"] == "preferred"
    [(path, headers, forwarded)] = FakeUpstream.seen
    assert path == "/v1/chat/completions"
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer sk-up"
    assert forwarded == {**BODY, "max_tokens": 500, "temperature": 0.2, "extra_field": "kept"}
    assert budget(client)["used"] == 23


def test_an_upstream_error_is_a_502_and_refunded(client, upstream, quota_config):
    # 5xx answers are retried (backoff with jitter) until the deadline, then a 502 (unless
    # the circuit breaker opens first: tests/llm/test_resilience.py).
    quota_config(
        LLM_DEADLINE_SECONDS=1.0, LLM_RETRY_BASE_SECONDS=0.05, PROVIDER_BREAKER_FAILURES=50
    )
    FakeUpstream.status = 503
    with override_settings(GATEWAY=_gateway_settings(UPSTREAM_URL=upstream)):
        response = chat(client)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert error["message"] == "The upstream API answered HTTP 503: Overloaded"
    assert len(FakeUpstream.seen) > 1  # retried
    assert budget(client)["used"] == 0


def test_an_upstream_4xx_is_passed_on_and_refunded(client, upstream):
    FakeUpstream.status = 400
    with override_settings(GATEWAY=_gateway_settings(UPSTREAM_URL=upstream)):
        response = chat(client)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The upstream API answered HTTP 400: Overloaded"
    assert len(FakeUpstream.seen) == 1  # a 400 is the request's fault: never retried
    assert budget(client)["used"] == 0


def test_an_unreachable_upstream_is_a_502(client, quota_config):
    quota_config(
        LLM_DEADLINE_SECONDS=0.5, LLM_RETRY_BASE_SECONDS=0.05, PROVIDER_BREAKER_FAILURES=50
    )
    with refusing_port() as port:
        unreachable = _gateway_settings(UPSTREAM_URL=f"http://127.0.0.1:{port}/v1")
        with override_settings(GATEWAY=unreachable):
            response = chat(client)
    assert response.status_code == 502
    assert "could not be reached" in response.json()["error"]["message"]
    assert budget(client)["used"] == 0


# -- the seeded demo ----------------------------------------------------------------------------
def test_every_demo_plan_reserves_at_least_the_fake_answer_by_default():
    from project.gateway.management.commands.seed_demo import DEMO_PLANS

    for plan in DEMO_PLANS:
        assert plan["default_output_tokens"] >= settings.GATEWAY["FAKE_ANSWER_TOKENS"], plan["slug"]


def test_a_demo_request_without_max_tokens_is_refunded_not_in_debt(on_commit):
    from project.gateway.management.commands.seed_demo import seed_demo
    from quotas.models import UsageRecord

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {seed_demo().key}")  # the free plan
    with on_commit(execute=True):
        response = chat(client)  # no max_tokens: the plan's default output allowance
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == ANSWER_TOKENS
    record = UsageRecord.objects.get()
    assert record.actual_tokens == PROMPT_TOKENS + ANSWER_TOKENS
    assert record.estimated_tokens >= record.actual_tokens  # refunded, never charged extra
