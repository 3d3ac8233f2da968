"""The degradation ladder: each rung is reached exactly when the one above refuses, the
ledger records the model that ran, a cache hit costs what the plan says, the last rung is a
deferred job that only its owner can read. The fake upstream's own limits are per model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from quotas import llm, services
from quotas.models import DeferredJob, UsageRecord
from tests.llm.conftest import chat, used
from tests.upstream_server import Upstream, running_upstream

pytestmark = pytest.mark.django_db(transaction=True)

LIMITS = {"gpt-4o": {"rpm": 1}, "gpt-4o-mini": {"rpm": 1}}


@pytest.fixture(scope="module")
def limited() -> Iterator[Upstream]:
    """One request per model per minute."""
    args = ("--rpm", "1000", "--window", "60", "--model-limits", json.dumps(LIMITS))
    with running_upstream(*args) as server:
        yield server


@pytest.fixture
def upstream_1rpm(limited: Upstream) -> Upstream:
    limited.control(reset=True, mode="normal")
    return limited


@pytest.fixture
def fast(quota_config: Any) -> None:
    """The package's short retry and breaker times, with room for a slow answer: on a loaded
    machine an attempt that timed out after the upstream served it spends that model's one
    request, and the ladder would start a rung too low. No test here is about timeouts."""
    quota_config(
        LLM_DEADLINE_SECONDS=30.0,
        LLM_ATTEMPT_TIMEOUT_SECONDS=10.0,
        LLM_RETRY_BASE_SECONDS=0.05,
        LLM_RETRY_MAX_SECONDS=0.2,
        PROVIDER_BREAKER_RESET_SECONDS=1.5,
        PROVIDER_BACKOFF_SECONDS=0.3,
    )


def ladder_plan(make_plan: Any, **fields: Any) -> Any:
    defaults = {
        "fallback_models": ["gpt-4o-mini"],
        "serve_from_cache": True,
        "cache_hit_cost": "0.5",
        "defer_when_refused": True,
    }
    return make_plan(**{**defaults, **fields})


def test_each_rung_serves_exactly_when_the_one_above_refuses(
    make_plan, make_user, upstream_1rpm, provider, fast, queued_jobs, on_commit
):
    user = make_user(plan=ladder_plan(make_plan, tokens_per_hour=100_000))
    sdk = openai.OpenAI(base_url=upstream_1rpm.url, api_key="k")
    client = llm.wrap(sdk, user=user, provider=provider, degrade=True)
    with on_commit(execute=True):
        first = client.chat.completions.create(**chat())  # gpt-4o has its one request
        second = client.chat.completions.create(**chat())  # gpt-4o refuses: the cheaper one
        before = used(user)
        third = client.chat.completions.create(**chat())  # both refuse: the cache
    assert [first.quota_rung, second.quota_rung, third.quota_rung] == [
        "preferred",
        "fallback",
        "cache",
    ]
    assert (first.model, second.model, third.model) == ("gpt-4o", "gpt-4o-mini", "gpt-4o-mini")
    # The cache answers the same request; a hit costs half the cached answer's tokens.
    assert used(user) - before == math.ceil(0.5 * second.usage.total_tokens)
    models = sorted(UsageRecord.objects.values_list("model", flat=True))
    assert models == ["cache:gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]

    with pytest.raises(llm.Deferred) as deferred:  # a new request: no cached answer
        client.chat.completions.create(**chat(messages=[{"role": "user", "content": "New"}]))
    job = DeferredJob.objects.get(pk=deferred.value.job_id)
    assert (job.user_id, job.status, job.request["model"]) == (user.pk, "queued", "gpt-4o")
    assert queued_jobs == [(str(job.pk), pytest.approx(deferred.value.retry_after, abs=0.01))]
    assert deferred.value.retry_after > 30  # the upstream's minute window, as it said
    assert upstream_1rpm.stats().get("limited", 0) == 0  # no provider 429 was ever met


def test_without_degrade_the_caller_gets_the_refusal(
    make_plan, make_user, upstream_1rpm, provider, fast
):
    user = make_user(plan=ladder_plan(make_plan))
    client = llm.wrap(
        openai.OpenAI(base_url=upstream_1rpm.url, api_key="k"), user=user, provider=provider
    )
    client.chat.completions.create(**chat())
    with pytest.raises(llm.ProviderRefused) as refused:
        client.chat.completions.create(**chat())  # the minute's one request is taken
    assert refused.value.scope == "provider" and refused.value.retry_after > 30
    assert upstream_1rpm.stats()["requests"] == 1  # held back, never sent
    answer = client.chat.completions.create(**chat(), degrade=True)  # per call
    assert answer.quota_rung == "fallback"


@pytest.mark.parametrize(("share", "charged"), [("0", 0), ("1", 1.0), ("0.25", 0.25)])
def test_a_cache_hit_charges_what_the_plan_says(
    share, charged, make_plan, make_user, upstream_1rpm, provider, fast, on_commit
):
    plan = ladder_plan(
        make_plan, fallback_models=[], cache_hit_cost=share, defer_when_refused=False
    )
    user = make_user(plan=plan)
    client = llm.wrap(
        openai.OpenAI(base_url=upstream_1rpm.url, api_key="k"),
        user=user,
        provider=provider,
        degrade=True,
    )
    with on_commit(execute=True):
        answer = client.chat.completions.create(**chat())
        before = used(user)
        hit = client.chat.completions.create(**chat())
    assert hit.quota_rung == "cache"
    assert hit.choices[0].message.content == answer.choices[0].message.content
    assert used(user) - before == math.ceil(charged * answer.usage.total_tokens)
    assert UsageRecord.objects.count() == (2 if charged else 1)


def test_a_streamed_request_is_served_from_the_cache_as_a_stream(
    make_plan, make_user, upstream_1rpm, provider, fast
):
    user = make_user(plan=ladder_plan(make_plan, fallback_models=[], defer_when_refused=False))
    client = llm.wrap(
        openai.OpenAI(base_url=upstream_1rpm.url, api_key="k"),
        user=user,
        provider=provider,
        degrade=True,
    )
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**chat(stream=True))
    )
    hit = client.chat.completions.create(**chat(stream=True))
    assert hit.quota_rung == "cache"
    assert "".join(c.choices[0].delta.content or "" for c in hit) == text


def test_the_users_budget_refusing_every_model_ends_in_a_deferred_job(
    make_plan, make_user, upstream_1rpm, provider, fast, queued_jobs
):
    user = make_user(plan=ladder_plan(make_plan, tokens_per_hour=100, serve_from_cache=False))
    client = llm.wrap(
        openai.OpenAI(base_url=upstream_1rpm.url, api_key="k"),
        user=user,
        provider=provider,
        degrade=True,
    )
    client.chat.completions.create(**chat())  # 61 of 100 tokens
    with pytest.raises(llm.Deferred) as deferred:
        client.chat.completions.create(**chat())
    assert deferred.value.retry_after >= 1
    assert upstream_1rpm.stats()["requests"] == 1  # refused by the budget: nothing sent


def test_the_gateway_degrades_only_when_asked_and_only_the_owner_reads_a_job(
    make_plan, make_user, upstream_1rpm, fast, queued_jobs, settings
):
    settings.GATEWAY = {
        **settings.GATEWAY,
        "UPSTREAM_URL": upstream_1rpm.url,
        "UPSTREAM_PROVIDER": f"gw-{upstream_1rpm.port}",
    }
    services.forget_provider(f"gw-{upstream_1rpm.port}", "gpt-4o")
    user = make_user(plan=ladder_plan(make_plan, tokens_per_hour=100, serve_from_cache=False))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    body = json.dumps(chat())
    first = api.post("/v1/chat/completions", body, content_type="application/json")
    assert first.status_code == 200 and first["X-Quota-Rung"] == "preferred"
    plain = api.post("/v1/chat/completions", body, content_type="application/json")
    assert plain.status_code == 429 and int(plain["Retry-After"]) >= 1  # unchanged contract
    assert plain.json()["error"]["type"] == "tokens"
    asked = api.post(
        "/v1/chat/completions", body, content_type="application/json", HTTP_X_QUOTA_DEGRADE="allow"
    )
    assert asked.status_code == 202 and asked["X-Quota-Rung"] == "deferred"
    job_url = asked.json()["url"]
    mine = api.get(job_url)
    assert mine.status_code == 200 and mine.json()["status"] == "queued"

    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=make_user()).key}")
    assert other.get(job_url).status_code == 404
    assert other.get("/quotas/jobs/00000000-0000-0000-0000-000000000000/").status_code == 404


def test_a_free_cache_hit_after_a_throttle_refusal_carries_no_retry_after(
    make_plan, make_user, upstream_1rpm, fast, queued_jobs, settings
):
    settings.GATEWAY = {
        **settings.GATEWAY,
        "UPSTREAM_URL": upstream_1rpm.url,
        "UPSTREAM_PROVIDER": f"gw-{upstream_1rpm.port}",
    }
    services.forget_provider(f"gw-{upstream_1rpm.port}", "gpt-4o")
    plan = ladder_plan(
        make_plan,
        tokens_per_hour=100,
        fallback_models=[],
        cache_hit_cost="0",
        defer_when_refused=False,
    )
    api = APIClient()
    api.credentials(
        HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=make_user(plan=plan)).key}"
    )
    body = json.dumps(chat())
    assert (
        api.post("/v1/chat/completions", body, content_type="application/json").status_code == 200
    )
    refused = api.post("/v1/chat/completions", body, content_type="application/json")
    assert refused.status_code == 429 and "Retry-After" in refused
    cached = api.post(
        "/v1/chat/completions", body, content_type="application/json", HTTP_X_QUOTA_DEGRADE="allow"
    )
    assert cached.status_code == 200 and cached["X-Quota-Rung"] == "cache"
    assert "Retry-After" not in cached and "retry-after-ms" not in cached  # nothing to wait for
