"""Metered streams in trouble: malformed events, Redis gone before the stream ends, and a
settle that raises. The client always gets the whole stream; usage is never lost."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.test import APIClient

from quotas import ledger, services
from quotas.core.tokens import encoding_for_model
from quotas.models import UsageRecord
from quotas.signals import usage_settled
from quotas.streaming import StreamMeter
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


# -- What the meter reads of the events ------------------------------------------------------


def _event(payload: dict[str, Any], newline: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(payload).encode() + newline + newline


def _words(count: int, newline: bytes = b"\n") -> list[bytes]:
    return [_event({"choices": [{"delta": {"content": " word"}}]}, newline)] * count


def _metered(user: Any, chunks: list[bytes]) -> tuple[Any, StreamMeter]:
    reservation = services.reserve(user, 500, model="gpt-4", prompt_tokens=7)
    meter = StreamMeter(iter(chunks), reservation, 7)
    return reservation, meter


def _settled(user: Any, chunks: list[bytes]) -> tuple[int, int]:
    """(prompt, completion) tokens the meter settled ``chunks`` with."""
    reservation, meter = _metered(user, chunks)
    assert b"".join(meter) == b"".join(chunks)  # every chunk passes as it came
    meter.close()
    assert len(reservation.settlements) == 1
    row = UsageRecord.objects.get(request_id=reservation.id)
    return row.prompt_tokens, row.completion_tokens


def _text_tokens(count: int) -> int:
    return len(encoding_for_model("gpt-4").encode(" word" * count))


def test_the_usage_event_is_read_when_split_across_chunks(user):
    usage = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 40}})
    chunks = [*_words(5), usage[:17], usage[17:30], usage[30:], b"data: [DONE]\n\n"]
    assert _settled(user, chunks) == (3, 40)


def test_the_last_usable_usage_block_stands(user):
    first = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 40}})
    second = _event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 41}})
    broken = _event({"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": "x"}})
    assert _settled(user, [first, second, broken]) == (4, 41)
    # "usage" outside an event's data (a comment), or in its text, is not a usage block.
    chunks = [b': {"usage": {"prompt_tokens": 1}}\n', *_words(2)]
    chunks.append(_event({"choices": [{"delta": {"content": 'say "usage"'}}]}))
    text = len(encoding_for_model("gpt-4").encode(' word word say "usage"'))
    assert _settled(user, chunks) == (7, text)


def test_events_with_crlf_line_ends_are_read(user):
    usage = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}, b"\r\n")
    assert _settled(user, [*_words(3, b"\r\n"), usage]) == (3, 9)
    assert _settled(user, _words(3, b"\r\n")) == (7, _text_tokens(3))


def test_a_line_never_ended_is_not_read(user):
    chunks = [*_words(2), b'data: {"choices": [{"delta": {"content": " word"}}]}']
    assert _settled(user, chunks) == (7, _text_tokens(2))


def test_a_long_stream_without_usage_is_read_whole_in_bounded_memory(user):
    """Past ``PENDING_BYTES`` the events kept so far are read and forgotten: the meter never
    holds more than that plus one chunk, and every word still counts, the events cut at
    the chunks' edges too."""
    count = 3 * StreamMeter.PENDING_BYTES // len(_words(1)[0])
    body = b"".join(_words(count))
    size = 1000  # no divisor of an event's length: the reads fall inside events
    reservation, meter = _metered(user, [body[i : i + size] for i in range(0, len(body), size)])
    largest = 0
    for _ in meter:
        largest = max(largest, meter._kept_size)
    meter.close()
    assert StreamMeter.PENDING_BYTES - size < largest <= StreamMeter.PENDING_BYTES + size
    row = UsageRecord.objects.get(request_id=reservation.id)
    assert (row.prompt_tokens, row.completion_tokens) == (7, _text_tokens(count))
