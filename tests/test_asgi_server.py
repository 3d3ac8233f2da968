"""The demo under a real uvicorn (one worker process, ASGI) on the real Redis: streamed
completions of a slow fake model (300 tokens over about 2 s, an async generator on the
event loop), many at once. Every stream is settled exactly once, the ledger holds what was
streamed, the first byte comes before the model has finished, clients that hang up are
settled with what they were sent, the event loop never stalls, and Redis stopped mid-load
costs no 5xx and no hung stream."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from typing import Any

import pytest
from django.db.models import Sum
from rest_framework.authtoken.models import Token

from project.devtools.redis_server import start_private_redis
from quotas import services
from quotas.models import UsageRecord
from tests.asgi_server import chunked_lines, running_asgi_gateway

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SECONDS = 2.0  # how long the fake model takes to stream one answer
ANSWER_TOKENS = 300
BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Tell me a story."}],
    "max_tokens": 400,
    "stream": True,
}
STREAMS = int(os.environ.get("ASGI_TEST_STREAMS", "300"))  # concurrent streams, one worker
SERVER_ENV = {
    "GATEWAY_FAKE_STREAM_SECONDS": str(SECONDS),
    "GATEWAY_FAKE_ANSWER_TOKENS": str(ANSWER_TOKENS),
    "GATEWAY_SYNC_THREADS": os.environ.get("GATEWAY_SYNC_THREADS", "2"),
    "GATEWAY_ADMISSION_LIMIT": os.environ.get("GATEWAY_ADMISSION_LIMIT", "4"),
}


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=100_000_000))


@pytest.fixture
def token(user: Any) -> str:
    return Token.objects.create(user=user).key


@pytest.fixture
def server(isolated_quotas: str, token: str) -> Any:
    with running_asgi_gateway(isolated_quotas, **SERVER_ENV) as port:
        yield port


async def stream(port: int, token: str, *, hang_up_after: int | None = None) -> dict[str, Any]:
    """One streamed completion over a connection of its own: its status, when its first
    byte came, the content events received, the usage it ended with, whether it ended with
    ``[DONE]``. ``hang_up_after``: close the connection after that many content events."""
    start = time.monotonic()
    result: dict[str, Any] = {"first": None, "events": 0, "usage": None, "done": False}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = json.dumps(BODY).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        result["status"] = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
        while (await reader.readline()).strip():  # the headers
            pass
        async for line in chunked_lines(reader):
            if result["first"] is None:
                result["first"] = time.monotonic() - start
            _note(result, line)
            if hang_up_after is not None and result["events"] >= hang_up_after:
                break
    finally:
        writer.close()
    result["total"] = time.monotonic() - start
    return result


def _note(result: dict[str, Any], line: str) -> None:
    # Cheap on purpose (the client shares the machine with the server): only the usage
    # event is parsed; a content event is one whose delta has non-empty content.
    if line == "data: [DONE]":
        result["done"] = True
    elif line.startswith("data: {") and '"usage"' in line:
        result["usage"] = json.loads(line[6:]).get("usage") or result["usage"]
    elif '"delta":{"content":"' in line and '"delta":{"content":""' not in line:
        result["events"] += 1


def run_streams(port: int, token: str, count: int, **options: Any) -> list[dict[str, Any]]:
    async def all_streams() -> list[dict[str, Any]]:
        return await asyncio.gather(*(stream(port, token, **options) for _ in range(count)))

    return asyncio.run(all_streams())


def loop_lags(port: int, reset: bool = False) -> list[float]:
    query = "?reset" if reset else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__loop_lag/{query}", timeout=10) as r:
        return json.loads(r.read())


def ledger_rows(count: int, timeout: float = 20.0) -> Any:
    """The ledger once it holds ``count`` rows (the server writes them in batches)."""
    deadline = time.monotonic() + timeout
    while UsageRecord.objects.count() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return UsageRecord.objects.all()


def test_a_stream_starts_before_the_model_finishes_and_settles_its_usage(server, token, user):
    [result] = run_streams(server, token, 1)
    assert result["status"] == 200 and result["done"]
    assert result["first"] < SECONDS / 2 < result["total"]  # not buffered whole
    rows = ledger_rows(1)
    assert [row.actual_tokens for row in rows] == [result["usage"]["total_tokens"]]
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"]) == (result["usage"]["total_tokens"], 0)


def test_clients_that_hang_up_are_settled_with_what_they_were_sent(server, token, user):
    results = run_streams(server, token, 20, hang_up_after=5)
    assert all(r["status"] == 200 and not r["done"] for r in results)
    rows = ledger_rows(20)
    assert len(rows) == 20
    for row in rows:  # 5 pieces of 4 tokens were sent (a few more may have been produced)
        assert 20 <= row.completion_tokens < ANSWER_TOKENS
    budget = services.budget_for(user)
    assert budget["reserved"] == 0
    assert budget["used"] == rows.aggregate(total=Sum("actual_tokens"))["total"]


@pytest.mark.slow
def test_300_concurrent_streams_under_one_worker(server, token, user):
    warm = run_streams(server, token, 2)  # the first requests load the tokenizer and views
    warm_tokens = sum(r["usage"]["total_tokens"] for r in warm)
    ledger_rows(2)
    loop_lags(server, reset=True)
    started = time.monotonic()
    results = run_streams(server, token, STREAMS)
    elapsed = time.monotonic() - started
    lags = loop_lags(server)
    p99 = lags[int(len(lags) * 0.99)]
    firsts = sorted(r["first"] or 99 for r in results)
    print(
        f"{STREAMS} streams in {elapsed:.2f}s; first byte p50 {firsts[len(firsts) // 2]:.2f}s"
        f" p99 {firsts[int(len(firsts) * 0.99)]:.2f}s;"
        f" loop lag p50 {lags[len(lags) // 2]:.1f} ms p99 {p99:.1f} ms max {lags[-1]:.1f} ms"
    )

    failed = [r for r in results if r["status"] != 200 or not r["done"]]
    assert failed == [], (len(failed), [sorted(f.items()) for f in failed[:3]])
    streamed = sum(r["usage"]["total_tokens"] for r in results)
    rows = ledger_rows(STREAMS + 2)
    assert rows.count() == STREAMS + 2  # each settled once: one row per request
    assert rows.aggregate(total=Sum("actual_tokens"))["total"] == streamed + warm_tokens
    budget = services.budget_for(user)
    assert (budget["used"], budget["reserved"]) == (streamed + warm_tokens, 0)
    assert budget["in_flight"] == 0
    # Streamed as the model produced, not buffered: each body came over most of 2 s.
    assert all(r["total"] - r["first"] > SECONDS / 2 for r in results)
    assert p99 < 50


@pytest.mark.slow
def test_redis_stopped_mid_load_gives_no_5xx_and_no_hung_stream(tmp_path, isolated_quotas, token):
    redis = start_private_redis(data_dir=tmp_path)
    try:
        with running_asgi_gateway(isolated_quotas, REDIS_URL=redis.url, **SERVER_ENV) as port:

            async def load() -> list[dict[str, Any]]:
                waves = []
                for wave in range(4):  # streams starting before, during and after the stop
                    waves.append(asyncio.to_thread(run_streams, port, token, 25))
                    if wave == 1:
                        await asyncio.to_thread(redis.stop)
                    await asyncio.sleep(0.7)
                results = await asyncio.gather(*waves)
                return [r for wave in results for r in wave]

            results = asyncio.run(load())
            rows = ledger_rows(100).count()
    finally:
        redis.stop()
    assert [r["status"] for r in results if r["status"] != 200] == []
    assert all(r["done"] and r["total"] < SECONDS + 10 for r in results)
    assert rows == 100  # every stream's usage reached the ledger
