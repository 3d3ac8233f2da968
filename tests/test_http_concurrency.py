"""64 concurrent clients against 4 gunicorn worker processes, one user: the tokens admitted
never exceed the budget, the budget is used up, and the rest are refused with 429.

The fake answer is longer than any request's ``max_tokens``, so every served request uses
exactly its estimate (prompt + ``max_tokens``): no refunds, and the admitted total is the sum
of the served requests' estimates.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from quotas import services
from quotas.core.tokens import count_chat_tokens, encoding_for_model
from tests.gateway_server import running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BUDGET = 20_000
CLIENTS = 64
REQUESTS_PER_CLIENT = 4
WORDS = ("quota", "window", "bucket", "token", "reserve", "settle", "refund", "ledger")


@pytest.fixture
def port(isolated_quotas: str, transactional_db: Any) -> Iterator[int]:
    with running_gateway(isolated_quotas, workers=4, GATEWAY_FAKE_ANSWER_TOKENS="5000") as port:
        yield port


def request_bodies(count: int) -> list[tuple[dict[str, Any], int]]:
    """Bodies estimated at 300-600 tokens, each with its estimate."""
    rng = random.Random(7)
    encoding = encoding_for_model("gpt-4")
    bodies = []
    for _ in range(count):
        messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))}]
        estimate = rng.randint(300, 600)
        max_tokens = estimate - count_chat_tokens(encoding, messages)
        body = {"model": "gpt-4", "messages": messages, "max_tokens": max_tokens}
        bodies.append((body, estimate))
    return bodies


def post(port: int, token: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def test_concurrent_clients_never_get_more_than_the_budget(port, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=BUDGET))
    token = Token.objects.create(user=user).key
    bodies = request_bodies(CLIENTS * REQUESTS_PER_CLIENT)
    assert all(body["max_tokens"] >= 100 for body, _ in bodies)
    start = threading.Barrier(CLIENTS)

    def client(share: list[tuple[dict[str, Any], int]]) -> list[tuple[int, Any, int]]:
        start.wait()  # all clients fire together
        return [(*_status_and_body(post(port, token, body)), est) for body, est in share]

    shares = [bodies[i::CLIENTS] for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for share in pool.map(client, shares) for r in share]

    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    served = [(body, estimate) for status, body, estimate in results if status == 200]
    assert all(body["usage"]["total_tokens"] == estimate for body, estimate in served)
    admitted = sum(estimate for _, estimate in served)
    assert admitted <= BUDGET
    # After the first 429, what is left is smaller than some request (estimates are at most
    # 600 and nothing is refunded), so the budget was used up, not under-admitted.
    assert statuses.count(429) > 0
    assert admitted > BUDGET - 600
    assert services.budget_for(user)["used"] == admitted


def _status_and_body(response: tuple[int, dict[str, str], Any]) -> tuple[int, Any]:
    status, headers, body = response
    if status == 200:
        assert int(headers["X-RateLimit-Remaining"]) >= 0
    return status, body


def test_settles_batched_in_the_workers_charge_exactly_what_was_used(
    isolated_quotas, transactional_db, make_plan, make_user
):
    """``SETTLE_BATCH_SECONDS`` on real workers: each answer uses less than its estimate (the
    fake answer is shorter than ``max_tokens``), so every settle is a refund that reaches Redis
    from a batch; afterwards the window holds exactly the usage the answers reported, and the
    ledger has one row per request with its actual figure."""
    from quotas import ledger
    from quotas.models import UsageRecord

    user = make_user(plan=make_plan(tokens_per_hour=10**9))
    token = Token.objects.create(user=user).key
    bodies = request_bodies(96)
    with running_gateway(
        isolated_quotas,
        workers=2,
        GATEWAY_FAKE_ANSWER_TOKENS="20",
        QUOTAS_SETTLE_BATCH_SECONDS="0.05",
    ) as port:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda pair: post(port, token, pair[0]), bodies))
        assert {status for status, _, _ in results} == {200}
        used = sum(body["usage"]["total_tokens"] for _, _, body in results)
        assert used < sum(estimate for _, estimate in bodies)  # every settle refunded some
        deadline = time.monotonic() + 10
        while services.budget_for(user)["used"] != used:  # the batches reach Redis
            assert time.monotonic() < deadline, (services.budget_for(user)["used"], used)
            time.sleep(0.05)
    ledger.flush_ledger()  # whatever a batch of ledger records left in the outbox
    rows = UsageRecord.objects.filter(user=user)
    assert rows.count() == len(bodies)
    assert sum(rows.values_list("actual_tokens", flat=True)) == used
    assert set(rows.values_list("status", flat=True)) == {"settled"}


def test_settles_still_in_a_batch_are_sent_when_a_worker_stops(
    isolated_quotas, transactional_db, make_plan, make_user
):
    """A batch that never comes due (an hour) goes out when gunicorn stops its workers."""
    user = make_user(plan=make_plan(tokens_per_hour=10**9))
    token = Token.objects.create(user=user).key
    bodies = request_bodies(12)
    with running_gateway(
        isolated_quotas,
        workers=2,
        GATEWAY_FAKE_ANSWER_TOKENS="20",
        QUOTAS_SETTLE_BATCH_SECONDS="3600",
    ) as port:
        results = [post(port, token, body) for body, _ in bodies]
        assert services.budget_for(user)["used"] == sum(estimate for _, estimate in bodies)
    used = sum(body["usage"]["total_tokens"] for _, _, body in results)
    assert services.budget_for(user)["used"] == used
