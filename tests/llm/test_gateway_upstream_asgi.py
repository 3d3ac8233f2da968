"""The demo gateway under a real uvicorn (ASGI) forwarding streams to the fake upstream: the
upstream call is made with the async client (the upstream counts the ``User-Agent`` of each
call: ``AsyncOpenAI``, never ``OpenAI``), the first byte comes before the upstream has
finished, the ledger holds the stream's usage, a client that hangs up is settled with what
was produced, the degradation ladder serves a stream (with a cheaper model, or as a job a
real Celery worker runs later), and upstream errors are answered as under WSGI."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from quotas import services
from quotas.models import DeferredJob, UsageRecord
from tests.asgi_server import chunked_lines, running_asgi_gateway
from tests.gateway_server import server_env
from tests.llm.conftest import chat
from tests.test_tasks_worker import _workers, wait_until
from tests.upstream_server import Upstream, running_upstream

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ANSWER_TOKENS = 200  # 50 pieces of 4 tokens
PACE = 0.04  # seconds between the upstream's chunks: about 2 s for an answer


@pytest.fixture
def user(make_plan: Any, make_user: Any) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=1_000_000))


def gateway(prefix: str, upstream: Upstream, **env: str) -> Any:
    """uvicorn serving the demo, forwarding to ``upstream`` under a provider name of its own."""
    return running_asgi_gateway(
        prefix,
        GATEWAY_UPSTREAM_URL=upstream.url,
        GATEWAY_UPSTREAM_PROVIDER=f"asgi-{uuid.uuid4().hex[:8]}",
        **{"GATEWAY_SYNC_THREADS": "2", **env},
    )


def stream(
    port: int, token: str, body: dict[str, Any], *, hang_up_after: int | None = None, **headers: str
) -> dict[str, Any]:
    """One streamed completion: status, headers, when the first event came, the chunks
    received, whether it ended with ``[DONE]``; ``hang_up_after``: close the connection
    after that many content chunks."""

    async def run() -> dict[str, Any]:
        start = time.monotonic()
        result: dict[str, Any] = {"first": None, "chunks": [], "done": False, "headers": {}}
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = json.dumps(body).encode()
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n".encode()
                + extra.encode()
                + b"\r\n"
                + data
            )
            await writer.drain()
            result["status"] = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
            while line := (await reader.readline()).strip():
                name, _, value = line.decode().partition(":")
                result["headers"][name.strip().lower()] = value.strip()
            if result["headers"].get("transfer-encoding") != "chunked":
                result["body"] = json.loads(await reader.read())
                return result
            async for event in chunked_lines(reader):
                if not event.strip():
                    continue
                if result["first"] is None:
                    result["first"] = time.monotonic() - start
                if event == "data: [DONE]":
                    result["done"] = True
                elif event.startswith("data: "):
                    result["chunks"].append(json.loads(event[6:]))
                content = [c for c in result["chunks"] if _content(c)]
                if hang_up_after is not None and len(content) >= hang_up_after:
                    break
        finally:
            writer.close()
        result["total"] = time.monotonic() - start
        return result

    return asyncio.run(run())


def _content(chunk: dict[str, Any]) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])


def ledger_rows(count: int, timeout: float = 20.0) -> list[UsageRecord]:
    """The ledger once it holds ``count`` rows (the server writes them in batches)."""
    deadline = time.monotonic() + timeout
    while UsageRecord.objects.count() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(UsageRecord.objects.order_by("pk"))


def settled(user: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The user's budget once nothing is reserved any more."""
    deadline = time.monotonic() + timeout
    budget = services.budget_for(user)
    while budget["reserved"] and time.monotonic() < deadline:
        time.sleep(0.1)
        budget = services.budget_for(user)
    return budget


def test_a_streamed_answer_is_forwarded_with_the_async_client_and_settled_by_its_usage(
    isolated_quotas, fresh_upstream, user
):
    fresh_upstream.control(pace=PACE, answer_tokens=ANSWER_TOKENS)
    token = Token.objects.create(user=user).key
    with gateway(isolated_quotas, fresh_upstream) as port:
        result = stream(port, token, chat(stream=True, max_tokens=400))
        rows = ledger_rows(1)
    assert result["status"] == 200 and result["done"]
    headers = result["headers"]
    assert headers["content-type"] == "text/event-stream"
    assert headers["x-quota-rung"] == "preferred" and headers["cache-control"] == "no-cache"
    assert headers["x-ratelimit-limit"] == "1000000"  # the quota middleware's headers
    stats = fresh_upstream.stats()
    assert stats["agent:AsyncOpenAI"] == stats["requests"] == 1  # not the sync OpenAI client
    assert "agent:OpenAI" not in stats
    # Streamed as the upstream produced it (about 2 s): the first byte long before the end
    # (the first request of a fresh server also loads the tokenizer: no bound on its start).
    assert result["total"] - result["first"] > 1.2
    usage = result["chunks"][-1]["usage"]
    assert result["chunks"][-1]["choices"] == [] and usage["completion_tokens"] == ANSWER_TOKENS
    [row] = rows
    assert (row.actual_tokens, row.completion_tokens) == (usage["total_tokens"], ANSWER_TOKENS)
    budget = settled(user)
    assert (budget["used"], budget["reserved"]) == (usage["total_tokens"], 0)


def test_a_client_that_hangs_up_is_settled_with_what_was_produced(
    isolated_quotas, fresh_upstream, user
):
    fresh_upstream.control(pace=PACE, answer_tokens=ANSWER_TOKENS)
    token = Token.objects.create(user=user).key
    with gateway(isolated_quotas, fresh_upstream) as port:
        result = stream(port, token, chat(stream=True, max_tokens=400), hang_up_after=5)
        assert result["status"] == 200 and not result["done"]
        [row] = ledger_rows(1)
    assert fresh_upstream.stats()["agent:AsyncOpenAI"] == 1
    # 5 pieces of 4 tokens were sent (a few more may have been read from the upstream).
    assert 20 <= row.completion_tokens < ANSWER_TOKENS
    budget = settled(user)
    assert (budget["used"], budget["reserved"]) == (row.actual_tokens, 0)


def test_the_ladder_serves_a_stream_with_a_cheaper_model(
    isolated_quotas, one_request_per_model, make_plan, make_user
):
    plan = make_plan(
        tokens_per_hour=1_000_000,
        fallback_models=["gpt-4o-mini"],
        serve_from_cache=False,
        defer_when_refused=False,
    )
    user = make_user(plan=plan)
    token = Token.objects.create(user=user).key
    body = chat(stream=True)
    # A call may wait 5 s for the provider (its window is a minute): the plain request is
    # refused at once.
    with gateway(isolated_quotas, one_request_per_model, QUOTAS_LLM_DEADLINE_SECONDS="5") as port:
        first = stream(port, token, body)  # gpt-4o's one request of the minute
        plain = stream(port, token, body)
        degraded = stream(port, token, body, **{"X-Quota-Degrade": "allow"})
        rows = ledger_rows(4)
    assert first["status"] == 200 and first["headers"]["x-quota-rung"] == "preferred"
    # Without consent the provider's refusal is the answer, as under WSGI.
    assert plain["status"] == 429 and int(plain["headers"]["retry-after"]) >= 1
    assert plain["body"]["error"]["code"] == "rate_limit_exceeded"
    assert degraded["status"] == 200 and degraded["done"]
    assert degraded["headers"]["x-quota-rung"] == "fallback"
    assert {c["model"] for c in degraded["chunks"]} == {"gpt-4o-mini"}
    stats = one_request_per_model.stats()
    assert stats["served:gpt-4o-mini"] == 1
    assert stats["agent:AsyncOpenAI"] == stats["requests"] and "agent:OpenAI" not in stats
    usages = [first["chunks"][-1]["usage"], degraded["chunks"][-1]["usage"]]
    served = [(row.model, row.actual_tokens) for row in rows if row.status == "settled"]
    assert served == [
        ("gpt-4o", usages[0]["total_tokens"]),
        ("gpt-4o-mini", usages[1]["total_tokens"]),
    ]
    # Refunded: the plain request's reservation, and the degraded one's for gpt-4o.
    assert [(row.status, row.actual_tokens) for row in rows if row.status != "settled"] == [
        ("refunded", 0),
        ("refunded", 0),
    ]
    budget = settled(user)
    assert (budget["used"], budget["reserved"]) == (sum(u["total_tokens"] for u in usages), 0)


def test_an_upstream_error_is_answered_and_refunded(isolated_quotas, fresh_upstream, user):
    token = Token.objects.create(user=user).key
    with gateway(isolated_quotas, fresh_upstream) as port:
        fresh_upstream.control(mode="fail", fail_status=400)
        result = stream(port, token, chat(stream=True))
    assert result["status"] == 400
    assert result["body"]["error"]["code"] == "upstream_error"
    assert result["body"]["error"]["message"].startswith("The upstream API answered HTTP 400")
    assert fresh_upstream.stats()["agent:AsyncOpenAI"] == 1
    budget = settled(user)
    assert (budget["used"], budget["reserved"]) == (0, 0)


def test_openings_do_not_queue_for_the_pools_threads(isolated_quotas, fresh_upstream, user):
    """The upstream takes 0.6 s to its first byte (a model thinking): with one pool thread,
    four streams opened at once all start within about that time, since the opening is
    awaited on the event loop, not in the pool's thread (which would serve them one after
    the other: the fourth first byte after 2.4 s)."""
    fresh_upstream.control(pace=0.01, answer_tokens=20)
    token = Token.objects.create(user=user).key
    with gateway(isolated_quotas, fresh_upstream, GATEWAY_SYNC_THREADS="1") as port:
        assert stream(port, token, chat(stream=True, max_tokens=40))["done"]  # warm
        fresh_upstream.control(first_byte_seconds=0.6)
        with ThreadPoolExecutor(max_workers=4) as pool:
            body = chat(stream=True, max_tokens=40)
            results = list(pool.map(lambda _: stream(port, token, body), range(4)))
    assert all(r["status"] == 200 and r["done"] for r in results)
    firsts = sorted(r["first"] for r in results)
    assert firsts[0] >= 0.6  # each waited for the upstream's first byte ...
    assert firsts[-1] < 1.8, firsts  # ... at the same time, not one after the other


# -- the last rung: a job a real Celery worker runs --------------------------------------
WINDOW_SECONDS = 10  # the windows of the upstream the deferred job waits for


@pytest.fixture
def one_request_per_short_window() -> Iterator[Upstream]:
    """A fake upstream of its own serving gpt-4o once per 10 s window (the first window
    starts when it is reset), so a job deferred until the next one runs within the test."""
    limits = json.dumps({"gpt-4o": {"rpm": 1}})
    args = ("--rpm", "1000", "--window", str(WINDOW_SECONDS), "--model-limits", limits)
    with running_upstream(*args) as server:
        yield server


@contextmanager
def celery_worker(prefix: str, **env: str) -> Iterator[None]:
    """A Celery worker with the settings the test's servers get (``server_env``): it takes
    the tasks they queue on the default queue, under the test's own broker key prefix."""
    settings = server_env(prefix, env)
    own = {name: value for name, value in settings.items() if os.environ.get(name) != value}
    url = settings.get("CELERY_BROKER_URL") or settings["REDIS_URL"]
    broker = {"url": url, "queue": "celery", "options": {}}
    with contextmanager(_workers)(broker, own) as start:
        start()
        yield


def job_of(port: int, token: str, url: str) -> dict[str, Any]:
    """The job as its owner reads it from the server (``GET /quotas/jobs/<id>/``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", url, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return dict(json.loads(response.read()))
    finally:
        conn.close()


def test_the_ladder_defers_a_stream_to_a_job_a_worker_runs_when_the_provider_can(
    isolated_quotas, one_request_per_short_window, make_plan, make_user
):
    upstream = one_request_per_short_window
    plan = make_plan(
        tokens_per_hour=1_000_000,
        fallback_models=[],
        serve_from_cache=False,
        defer_when_refused=True,
    )
    user, other = make_user(plan=plan), make_user(plan=plan)
    token = Token.objects.create(user=user).key
    body = chat(stream=True)
    # Tasks are queued by the server and run by a worker, as in production (not eagerly in
    # the request, where the job would run at once).
    queued = {"CELERY_TASK_ALWAYS_EAGER": "0"}
    with (
        gateway(isolated_quotas, upstream, **queued) as port,
        celery_worker(isolated_quotas, GATEWAY_UPSTREAM_URL=upstream.url, **queued),
    ):
        # Another user's request warms the server up (a model without a limit) ...
        warm = chat(stream=True, model="gpt-4o-mini")
        assert stream(port, Token.objects.create(user=other).key, warm)["done"]
        upstream.control(reset=True)  # ... then gpt-4o's first window starts
        first = stream(port, token, body)  # gpt-4o's one request of the window
        deferred = stream(port, token, body, **{"X-Quota-Degrade": "allow"})
        assert deferred["status"] == 202, deferred
        budget = settled(user)
        job = DeferredJob.objects.get(pk=deferred["body"]["id"])
        assert wait_until(lambda: _done(job), timeout=WINDOW_SECONDS + 30), _status(job)
        answer = job_of(port, token, deferred["body"]["url"])
        rows = ledger_rows(4)

    # The provider refused gpt-4o before it was sent (the learned window is spent): the
    # request was queued as a job, and the throttle's reservation given back.
    assert first["status"] == 200 and first["headers"]["x-quota-rung"] == "preferred"
    headers, queued_job = deferred["headers"], deferred["body"]
    assert headers["x-quota-rung"] == "deferred"
    assert 1 <= int(headers["retry-after"]) <= WINDOW_SECONDS
    assert queued_job["object"] == "quota.deferred_job" and queued_job["status"] == "queued"
    assert queued_job["url"] == f"/quotas/jobs/{queued_job['id']}/"
    first_tokens = first["chunks"][-1]["usage"]["total_tokens"]
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (first_tokens, 0, 0)

    # The worker ran the job once, when the provider's next window began, with its client.
    assert answer["status"] == "succeeded" and answer["attempts"] == 1, answer
    assert answer["model"] == "gpt-4o" and answer["result"]["choices"][0]["message"]["content"]
    done = DeferredJob.objects.get(pk=job.pk)
    assert done.started_at is not None
    waited = (done.started_at - done.created_at).total_seconds()
    assert waited >= int(headers["retry-after"]) - 1, waited
    stats = upstream.stats()
    # Since the reset: the first request and the job's (the deferred one was never sent).
    assert stats["requests:gpt-4o"] == stats["served:gpt-4o"] == 2
    assert stats["agent:OpenAI"] == 1  # the worker's sync client

    # Charged once: the first request and the job; the throttle's reservation refunded.
    job_tokens = answer["result"]["usage"]["total_tokens"]
    mine = sorted(
        (row.status, row.request_id.endswith(f"/job-{job.pk}"), row.actual_tokens)
        for row in rows
        if row.user_id == user.pk
    )
    assert mine == [
        ("refunded", False, 0),
        ("settled", False, first_tokens),
        ("settled", True, job_tokens),
    ]
    budget = settled(user)
    assert (budget["used"], budget["reserved"], budget["in_flight"]) == (
        first_tokens + job_tokens,
        0,
        0,
    )


def _status(job: DeferredJob) -> str:
    return str(DeferredJob.objects.get(pk=job.pk).status)


def _done(job: DeferredJob) -> bool:
    return _status(job) not in ("queued", "running")
