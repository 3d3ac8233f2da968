"""Redis stopped for 10 s under steady HTTP load, through a real gunicorn server.

Fail-open: no 5xx, no request held past the socket timeout, every served request in the
ledger; after Redis comes back (empty, as a restart without persistence leaves it), the window
is rebuilt from the ledger and enforcement resumes.
"""

from __future__ import annotations

import bisect
import http.client
import json
import re
import tempfile
import threading
import time
from typing import IO, Any

import pytest
from django.conf import settings
from django.test import override_settings
from rest_framework.authtoken.models import Token

from project.devtools.redis_server import start_private_redis
from quotas import ledger, services
from quotas.models import UsageRecord
from tests.conftest import quotas_settings
from tests.gateway_server import running_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

BODY = json.dumps(
    {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
)
UP_BEFORE, DOWN, UP_AFTER = 2.0, 10.0, 8.0  # seconds; after: the breaker probes every 5 s
SLOWEST = 1.5  # seconds: 0.25 s socket timeouts, so no request should come near this
PREFIX = "outage"


def _call(port: int, token: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started, wall = time.monotonic(), time.time()
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            BODY,
            {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
            },
        )
        response = conn.getresponse()
        response.read()
        return {
            "at": started,
            "wall": wall,
            "status": response.status,
            "seconds": time.monotonic() - started,
            "degraded": response.getheader("X-Quota-Degraded"),
            "remaining": response.getheader("X-RateLimit-Remaining"),
        }
    finally:
        conn.close()


def _used(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/quotas/me/", headers={"Authorization": f"Bearer {token}"})
        return json.loads(conn.getresponse().read())["used"]
    finally:
        conn.close()


def _audit(redis_url: str) -> None:
    caches = {**settings.CACHES, "outage": {**settings.CACHES["default"], "LOCATION": redis_url}}
    config = quotas_settings(KEY_PREFIX=PREFIX, CACHE_ALIAS="outage")
    with override_settings(CACHES=caches, QUOTAS=config):
        services.reset_runtime()
        ledger.audit_windows()
    services.reset_runtime()


ROUTINE = re.compile(
    r"quotas: (Redis unavailable|Redis circuit breaker|rebuilt the window|audit moved)"
)


def _missing_rows(
    results: list[dict[str, Any]], records: Any, log: IO[bytes], outage: tuple[float, float]
) -> str:
    """What a failure needs to be understood: the requests no row matches (a row is
    reserved between its request's start and end), and the server's output but its
    routine lines."""
    reserved = sorted(at.timestamp() for at in records.values_list("created_at", flat=True))
    unmatched, taken = [], [False] * len(reserved)
    # Earliest end first, each taking the earliest free row in its span: finds a match for
    # every request whenever one exists.
    for r in sorted(results, key=lambda r: r["wall"] + r["seconds"]):
        start, end = r["wall"] - 0.01, r["wall"] + r["seconds"] + 0.01
        i = bisect.bisect_left(reserved, start)
        while i < len(reserved) and taken[i] and reserved[i] <= end:
            i += 1
        if i < len(reserved) and reserved[i] <= end:
            taken[i] = True
        else:
            unmatched.append({k: r[k] for k in ("wall", "seconds", "degraded")})
    to_wall = results[0]["wall"] - results[0]["at"]
    stopped, restarted = (round(at + to_wall, 3) for at in outage)
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    unusual = [line for line in lines if not ROUTINE.match(line)]
    return (
        f"{records.count()} rows for {len(results)} served requests; no row for "
        f"{unmatched[:20]}; Redis stopped at {stopped}, restarted at {restarted}; the "
        "server's output but routine lines:\n" + "\n".join(unusual[-60:])
    )


def _load(port: int, token: str, until: float, results: list[dict[str, Any]]) -> None:
    first = True
    while time.monotonic() < until:
        results.append({**_call(port, token), "first": first})
        first = False
        time.sleep(0.02)


@pytest.fixture
def log() -> Any:
    """The server's output, read when a check fails."""
    with tempfile.TemporaryFile() as output:
        yield output


def test_redis_down_for_10_seconds_under_load(tmp_path, log, make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=10_000_000))
    token = Token.objects.create(user=user).key
    redis = start_private_redis(data_dir=tmp_path)
    results: list[dict[str, Any]] = []
    try:
        with running_gateway(PREFIX, workers=2, log=log, REDIS_URL=redis.url) as port:
            start = time.monotonic()
            end = start + UP_BEFORE + DOWN + UP_AFTER
            clients = [
                threading.Thread(target=_load, args=(port, token, end, results)) for _ in range(4)
            ]
            for client in clients:
                client.start()
            time.sleep(UP_BEFORE)
            redis.stop()
            stopped = time.monotonic()
            time.sleep(DOWN)
            redis.start()
            restarted = time.monotonic()
            for client in clients:
                client.join()
            used_after_outage = _used(port, token)
            # The audit a rebuild schedules (the server runs tasks eagerly: no countdown there).
            _audit(redis.url)
            used_after_audit = _used(port, token)
    finally:
        redis.stop()

    records = UsageRecord.objects.filter(user=user)
    # every served request has its row
    assert records.count() == len(results), _missing_rows(
        results, records, log, (stopped, restarted)
    )
    assert [r for r in results if r["status"] != 200] == []  # no 5xx, no 4xx either
    # Each client's first request meets a cold worker (Django's URLs and views, the tokenizer
    # load lazily), before Redis is stopped: on a loaded 2-core machine that alone took up to
    # 2.4 s, with Redis as with Valkey. The bound is for every request after it.
    assert max(r["seconds"] for r in results if not r["first"]) < SLOWEST
    during = [r for r in results if stopped + 0.5 < r["at"] < restarted - 0.5]
    assert during and all(r["degraded"] == "redis-unavailable" for r in during)
    last = [r for r in results if r["at"] > restarted + 6.0]
    assert last and all(r["degraded"] is None and r["remaining"] for r in last)
    assert records.filter(status="degraded").count() >= len(during)
    total = sum(records.values_list("actual_tokens", flat=True))
    # A rebuild cannot see ledger rows other workers are still writing (a worker serves
    # degraded until its own breaker probes), so right after the outage the window may count
    # less than the ledger, never more; the audit the rebuild schedules makes them match.
    assert used_after_outage <= total
    assert used_after_audit == total
