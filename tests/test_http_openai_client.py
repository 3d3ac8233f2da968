"""The official ``openai`` client, unchanged, against the demo gateway on a real gunicorn
server: completions with usage, streams, 429s it turns into ``RateLimitError``, and retries
that wait exactly the ``Retry-After`` the server gives and then succeed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest
from rest_framework.authtoken.models import Token

from quotas import services
from quotas.core.tokens import count_chat_tokens, encoding_for_model
from tests.gateway_server import running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

MESSAGES = [{"role": "user", "content": "Say something about sliding windows."}]
PROMPT_TOKENS = count_chat_tokens(encoding_for_model("gpt-4"), MESSAGES)


@pytest.fixture
def gateway(isolated_quotas: str, transactional_db: Any) -> Iterator[Callable[..., int]]:
    """``gateway()`` starts the server (after any ``quota_config``) and returns its port. It
    depends on the database fixture, so it stops before the database is flushed."""
    with ExitStack() as stack:
        yield lambda **env: stack.enter_context(running_gateway(isolated_quotas, **env))


@pytest.fixture
def account(make_plan, make_user) -> Callable[..., tuple[Any, str]]:
    def make(tokens_per_hour: int) -> tuple[Any, str]:
        user = make_user(plan=make_plan(tokens_per_hour=tokens_per_hour))
        return user, Token.objects.create(user=user).key

    return make


def client_for(port: int, token: str, **options: Any) -> openai.OpenAI:
    options.setdefault("max_retries", 0)
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=token, timeout=10, **options
    )


def ask(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(model="gpt-4", messages=MESSAGES, **fields)


def test_the_client_gets_completions_with_usage_and_quota_headers(gateway, account):
    user, token = account(10_000)
    client = client_for(gateway(), token)
    completion = ask(client, max_tokens=50)
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        50,
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4", messages=MESSAGES, max_tokens=1000
    )
    assert raw.parse().usage.completion_tokens == 300  # the whole answer: refunded the rest
    used = 2 * PROMPT_TOKENS + 50 + 300
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - used)
    assert services.budget_for(user)["used"] == used


def test_the_client_streams_and_the_stream_is_charged_its_usage(gateway, account):
    user, token = account(10_000)
    client = client_for(gateway(), token)
    stream = ask(client, max_tokens=1000, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(client, max_tokens=300).choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 300
    assert services.budget_for(user)["used"] == 2 * (PROMPT_TOKENS + 300)


def test_a_spent_budget_raises_rate_limit_error_with_the_servers_message(gateway, account):
    _, token = account(1000)
    client = client_for(gateway(), token)
    for _ in range(3):
        ask(client, max_tokens=300)  # 3 x (prompt + 300) of 1000
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, max_tokens=300)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.body["message"].startswith("Rate limit exceeded for tokens")
    assert str(error) == f"Error code: 429 - {error.body['message']}"
    assert error.body["requested"] == PROMPT_TOKENS + 300
    assert int(error.response.headers["Retry-After"]) == error.body["retry_after_seconds"]


def test_with_retries_the_client_waits_retry_after_and_then_succeeds(
    gateway, account, quota_config
):
    quota_config(WINDOW_SECONDS=4, BUCKET_SECONDS=0.5)
    _, token = account(1000)
    port = gateway()
    for _ in range(3):
        ask(client_for(port, token), max_tokens=300)
    refused_sent = time.monotonic()  # the refusal is decided after this moment
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client_for(port, token), max_tokens=300)
    wait = int(caught.value.response.headers["retry-after-ms"]) / 1000
    # The oldest bucket leaves once its end is 4 s old: at most window + bucket = 4.5 s.
    assert 1 < wait <= 4.5
    statuses: list[int] = []
    http_client = openai.DefaultHttpx2Client(
        event_hooks={"response": [lambda response: statuses.append(response.status_code)]}
    )
    completion = ask(
        client_for(port, token, max_retries=2, http_client=http_client), max_tokens=300
    )
    assert completion.usage.completion_tokens == 300
    # One 429, one wait of the server's Retry-After (not the client's 0.5 s backoff), and the
    # very next attempt succeeds: the wait was never too short.
    assert statuses == [429, 200]
    # And never early: the budget came back `wait` after the first refusal was decided.
    assert time.monotonic() - refused_sent >= wait - 0.002
