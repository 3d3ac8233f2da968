"""Fixtures of the provider-side tests: a fake upstream per test module, a user on a plan,
short deadlines and quick breakers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from quotas import llm, services
from quotas.engine import dispatch
from tests.upstream_server import Upstream, running_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """One fake upstream for the module: 1000 requests and 1M tokens a minute (limits the
    tests that need them start their own)."""
    with running_upstream("--rpm", "1000", "--tpm", "1000000") as server:
        yield server


@pytest.fixture
def fresh_upstream(upstream: Upstream) -> Upstream:
    upstream.control(reset=True, mode="normal", fail_count=None, pace=0.0, answer_tokens=60)
    return upstream


@pytest.fixture
def queued_jobs() -> Iterator[list[tuple[str, float]]]:
    """Deferred jobs are recorded instead of queued (the worker has its own test)."""
    queued: list[tuple[str, float]] = []
    saved = dispatch._senders.get(dispatch.RUN_JOB)
    dispatch.register(
        dispatch.RUN_JOB, lambda job_id, countdown=0: queued.append((job_id, countdown))
    )
    yield queued
    if saved is not None:
        dispatch.register(dispatch.RUN_JOB, saved)


@pytest.fixture
def one_request_per_model() -> Iterator[Upstream]:
    """A fake upstream of its own serving one request per model a minute."""
    limits = {"gpt-4o": {"rpm": 1}, "gpt-4o-mini": {"rpm": 1}}
    with running_upstream("--rpm", "1000", "--model-limits", json.dumps(limits)) as server:
        yield server


@pytest.fixture
def fast(quota_config: Callable[..., Any]) -> None:
    """Short deadlines, retries and breaker times, so failures are tested in seconds."""
    quota_config(
        LLM_DEADLINE_SECONDS=6.0,
        LLM_ATTEMPT_TIMEOUT_SECONDS=1.0,
        LLM_RETRY_BASE_SECONDS=0.05,
        LLM_RETRY_MAX_SECONDS=0.2,
        PROVIDER_BREAKER_RESET_SECONDS=1.5,
        PROVIDER_BACKOFF_SECONDS=0.3,
    )


@pytest.fixture
def user(make_plan: Callable[..., Any], make_user: Callable[..., Any]) -> Any:
    return make_user(plan=make_plan(tokens_per_hour=100_000))


@pytest.fixture
def sdk(fresh_upstream: Upstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=fresh_upstream.url, api_key="test-key", max_retries=0)


@pytest.fixture
def provider() -> str:
    """A provider name of the test's own (its shared state starts empty)."""
    return f"fake-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(sdk: openai.OpenAI, user: Any, provider: str) -> Any:
    return llm.wrap(sdk, user=user, provider=provider)


def chat(**extra: Any) -> dict[str, Any]:
    """A small chat request."""
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 50,
        **extra,
    }


def used(user: Any) -> int:
    """Tokens the user's window holds now (reserved ones included)."""
    return int(services.budget_for(user)["used"])
