"""The wrapped client against the fake upstream over HTTP: what the SDK returns, settled
with the answer's usage; streams settled when they end or are closed; failures refunded."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from openai.types.chat import ChatCompletion

import quotas
from quotas import llm, services
from quotas.core.encodings import count_text_tokens, encoding_for_model
from quotas.models import UsageRecord
from tests.llm.conftest import chat, used


def count(text: str) -> int:
    return count_text_tokens(encoding_for_model("gpt-4o"), text)


pytestmark = pytest.mark.django_db(transaction=True)


def test_a_call_returns_the_sdk_answer_and_charges_its_usage(client, user, on_commit):
    with on_commit(execute=True):
        answer = client.chat.completions.create(**chat())
    assert isinstance(answer, ChatCompletion)
    assert answer.quota_rung == "preferred"
    assert answer.choices[0].message.content
    assert used(user) == answer.usage.total_tokens  # the estimate (prompt + 50) was replaced
    row = UsageRecord.objects.get()
    assert (row.model, row.actual_tokens, row.status) == (
        "gpt-4o",
        answer.usage.total_tokens,
        "settled",
    )


def test_a_stream_is_the_sdks_and_settles_with_the_usage_chunk(client, user):
    chunks = list(client.chat.completions.create(**chat(stream=True)))
    assert all(chunk.choices for chunk in chunks)  # the usage chunk it did not ask for is kept
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    charged = used(user)
    prompt = services.estimate(chat()).prompt_tokens
    assert charged == prompt + count(text)  # the provider's usage, not the estimate (+50)

    shown = list(
        client.chat.completions.create(**chat(stream=True, stream_options={"include_usage": True}))
    )
    assert shown[-1].usage is not None and not shown[-1].choices
    assert used(user) == charged + shown[-1].usage.total_tokens


def test_a_stream_closed_early_is_charged_the_prompt_and_the_text_so_far(
    client, user, fresh_upstream
):
    fresh_upstream.control(answer_tokens=200)
    stream = client.chat.completions.create(**chat(stream=True, max_tokens=300))
    first = [next(stream) for _ in range(3)]
    stream.close()
    text = "".join(c.choices[0].delta.content or "" for c in first)
    assert text
    assert used(user) == services.estimate(chat()).prompt_tokens + count(text)


def test_a_failed_call_is_refunded(client, user, fresh_upstream, fast):
    fresh_upstream.control(mode="fail", fail_status=400)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat())
    assert used(user) == 0
    assert fresh_upstream.stats()["requests"] == 1  # a 400 is not retried


def test_retries_never_charge_twice(client, user, fresh_upstream, fast, on_commit):
    fresh_upstream.control(mode="fail", fail_status=503, fail_count=2)
    with on_commit(execute=True):
        answer = client.chat.completions.create(**chat())
    assert fresh_upstream.stats()["requests"] == 3
    assert used(user) == answer.usage.total_tokens
    assert UsageRecord.objects.count() == 1


def test_the_async_client(sdk, user, provider, fresh_upstream):
    async_sdk = openai.AsyncOpenAI(base_url=fresh_upstream.url, api_key="test-key")
    client = llm.wrap(async_sdk, user=user, provider=provider)

    async def run() -> tuple[Any, list[Any]]:
        answer = await client.chat.completions.create(**chat())
        stream = await client.chat.completions.create(**chat(stream=True))
        chunks = [chunk async for chunk in stream]
        # The quota steps ran in the thread Django gives sync code called from async code:
        # its database connection is closed as an ASGI server's request end would.
        await sync_to_async(connections.close_all)()
        return answer, chunks

    answer, chunks = asyncio.run(run())
    assert answer.quota_rung == "preferred" and chunks
    assert used(user) > answer.usage.total_tokens


def test_track_settles_what_the_block_records_and_refunds_on_error(user):
    with llm.track(user, 500) as usage:
        usage.record(prompt_tokens=20, completion_tokens=30)
    assert used(user) == 50
    with pytest.raises(RuntimeError), llm.track(user, chat()):
        raise RuntimeError("the other SDK failed")
    assert used(user) == 50
    with quotas.track(user, 100) as usage:
        usage.record({"input_tokens": 7, "output_tokens": 3})  # Anthropic's names
    assert used(user) == 60


def test_wrap_refuses_what_it_cannot_meter(sdk, user):
    with pytest.raises(TypeError, match="needs the user"):
        llm.wrap(sdk)
    with pytest.raises(TypeError, match=r"takes an openai\.OpenAI"):
        llm.wrap(object(), user=user)
