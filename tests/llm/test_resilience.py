"""Retries, the deadline and the circuit breaker, against the fake upstream over HTTP."""

from __future__ import annotations

import time

import openai
import pytest

from quotas import llm, services
from tests.llm.conftest import chat, used

pytestmark = pytest.mark.django_db(transaction=True)


def test_retries_wait_at_least_the_providers_retry_after(client, user, fresh_upstream, fast):
    fresh_upstream.control(mode="fail", fail_status=429, fail_count=2, retry_after_ms=600)
    started = time.monotonic()
    answer = client.chat.completions.create(**chat())
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content
    assert fresh_upstream.stats()["requests"] == 3
    assert elapsed >= 1.2  # two waits of at least 600 ms (the jitter alone is under 0.2 s)
    assert used(user) == answer.usage.total_tokens  # one reservation, charged once


def test_retries_stop_at_the_deadline(client, user, fresh_upstream, fast, quota_config):
    quota_config(
        LLM_DEADLINE_SECONDS=1.5,
        LLM_RETRY_BASE_SECONDS=0.05,
        LLM_RETRY_MAX_SECONDS=0.2,
        PROVIDER_BREAKER_FAILURES=100,
    )
    fresh_upstream.control(mode="fail", fail_status=503, retry_after_ms=400)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**chat())
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 0.3  # no wait starts that would end past the deadline
    assert 2 <= fresh_upstream.stats()["requests"] <= 4  # a try every 400 ms or more
    assert used(user) == 0  # refunded


def test_a_hanging_upstream_trips_the_breaker_then_calls_fail_fast_then_one_probes(
    client, user, fresh_upstream, fast, provider
):
    fresh_upstream.control(mode="hang", hang_seconds=5)
    with pytest.raises((llm.ProviderUnavailable, openai.APITimeoutError)):
        client.chat.completions.create(**chat())  # 1 s timeouts: the third opens the breaker
    assert fresh_upstream.stats()["requests"] == 3

    started = time.monotonic()
    with pytest.raises(llm.ProviderUnavailable) as refused:
        client.chat.completions.create(**chat())
    assert time.monotonic() - started < 0.2  # no waiting for a dead provider
    assert 0 < refused.value.retry_after <= 1.5
    assert fresh_upstream.stats()["requests"] == 3  # nothing was sent
    [state] = services.provider_states()
    assert state.breaker["state"] == "open"

    fresh_upstream.control(mode="normal")
    time.sleep(refused.value.retry_after)
    answer = client.chat.completions.create(**chat())  # the probe, half-open -> closed
    assert answer.choices[0].message.content
    [state] = services.provider_states()
    assert state.breaker == {"state": "closed", "failures": 0, "retry_after": 0.0}
    assert used(user) == answer.usage.total_tokens


def test_the_breaker_lets_one_probe_through_at_a_time(client, user, fresh_upstream, fast, provider):
    fresh_upstream.control(mode="fail", fail_status=500)
    with pytest.raises((llm.ProviderUnavailable, openai.InternalServerError)):
        client.chat.completions.create(**chat())
    time.sleep(1.6)  # the breaker is half-open now
    first = services.admit_call(provider, "gpt-4o", 10)
    second = services.admit_call(provider, "gpt-4o", 10)
    assert first.admitted and first.probe
    assert second.status is services.AdmitStatus.PROBING
    services.observe_call(provider, "gpt-4o", services.Outcome.FAILED, 10, admission=first)
    assert services.admit_call(provider, "gpt-4o", 10).status is services.AdmitStatus.BREAKER_OPEN
