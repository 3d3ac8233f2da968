"""The provider's limits as every process sees them: 4 gunicorn processes x 8 threads of the
demo gateway forward to the fake upstream through ``quotas.llm``.

- When the upstream's headers say how much is left, no process sends what it would refuse:
  not one provider 429, and the provider's limit is used.
- A storm of provider 429s holds every process back (the shared backoff, then the adaptive
  rate), and the rate recovers once the upstream answers again.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from quotas import services
from tests.gateway_server import running_gateway
from tests.llm.conftest import chat
from tests.upstream_server import Upstream, running_upstream

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

THREADS = 32
WINDOW = 4  # seconds of the upstream's fixed windows
RPM, TPM = 40, 1000  # per window; a request is charged 11 + 20 tokens: tokens bind first


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    args = ("--rpm", str(RPM), "--tpm", str(TPM), "--window", str(WINDOW))
    with running_upstream(*args) as server:
        yield server


@pytest.fixture
def gateway(upstream: Upstream, isolated_quotas: str, transactional_db: Any) -> Iterator[int]:
    env = {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "QUOTAS_LLM_DEADLINE_SECONDS": "5",
        "QUOTAS_LLM_ATTEMPT_TIMEOUT_SECONDS": "4",
        "QUOTAS_PROVIDER_BREAKER_RESET_SECONDS": "2",
    }
    with running_gateway(isolated_quotas, workers=4, **env) as port:
        yield port


def post(port: int, token: str, body: dict[str, Any]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def hammer(port: int, token: str, seconds: float) -> Counter[int]:
    """``THREADS`` clients sending one request after another for ``seconds``."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            status = post(port, token, chat(max_tokens=20))
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@pytest.fixture
def token(make_plan: Any, make_user: Any) -> str:
    user = make_user(plan=make_plan(tokens_per_hour=10_000_000))
    return str(Token.objects.create(user=user).key)


def test_the_providers_limit_is_never_exceeded_and_is_used(gateway, upstream, token):
    started = time.monotonic()
    statuses = hammer(gateway, token, seconds=3 * WINDOW)
    windows = (time.monotonic() - started) / WINDOW
    stats = upstream.stats()
    assert stats.get("limited", 0) == 0, (stats, statuses)  # never one provider 429
    # Every 200 was served by the upstream (on a loaded machine an answer can also come
    # after the client's attempt timed out: served upstream, then retried or a 504).
    assert statuses[200] <= stats["served"]
    # Tokens bind: 32 requests a window; at least all but the first and last window's worth.
    per_window = TPM // 31
    assert stats["served"] >= per_window * (int(windows) - 1), (stats, windows)
    # Held back past the deadline: a 429 from the gateway; an attempt that timed out at the
    # deadline: a 504.
    assert set(statuses) <= {200, 429, 504}


def test_a_429_storm_slows_every_process_and_the_rate_recovers(gateway, upstream, token):
    upstream.control(mode="fail", fail_status=429, retry_after_ms=500)
    before = upstream.stats().get("requests", 0)
    statuses = hammer(gateway, token, seconds=3)
    sent = upstream.stats()["requests"] - before
    # 32 clients kept asking for 3 s; every process held back together: after each 429,
    # 500 ms of backoff for all, then the adaptive rate.
    assert sum(statuses.values()) >= THREADS
    assert sent <= 20, (sent, statuses)
    [state] = services.provider_states()
    assert state.mode in ("backing off", "throttled") and state.adaptive_rate

    upstream.control(mode="normal", reset=True)
    hammer(gateway, token, seconds=WINDOW)
    deadline = time.monotonic() + 10
    while services.provider_states()[0].mode != "normal" and time.monotonic() < deadline:
        post(gateway, token, chat(max_tokens=20))
    [state] = services.provider_states()
    assert state.mode == "normal" and state.adaptive_rate is None, state
    assert upstream.stats().get("limited", 0) == 0  # the recovery itself met no 429
