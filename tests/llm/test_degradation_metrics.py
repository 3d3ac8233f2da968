"""The degradation ladder counted in the Prometheus metrics: each rung below the requested
model, and the deferred job at the bottom, moves ``quotas_degraded_requests_total``."""

from __future__ import annotations

import openai
import pytest
from prometheus_client import REGISTRY

from quotas import llm
from tests.llm import test_degradation as ladder
from tests.llm.conftest import chat

# The ladder tests' fixtures (queued_jobs is in the conftest).
limited = ladder.limited
upstream_1rpm = ladder.upstream_1rpm

pytestmark = pytest.mark.django_db(transaction=True)


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_rung_below_the_requested_model_is_counted(
    make_plan,
    make_user,
    upstream_1rpm,
    provider,
    fast,
    queued_jobs,
    on_commit,
):
    rungs = ("fallback", "cache", "deferred")
    before = {rung: counted("quotas_degraded_requests_total", rung=rung) for rung in rungs}
    jobs_before = counted("quotas_deferred_jobs_created_total")
    user = make_user(plan=ladder.ladder_plan(make_plan, tokens_per_hour=100_000))
    client = llm.wrap(
        openai.OpenAI(base_url=upstream_1rpm.url, api_key="k"),
        user=user,
        provider=provider,
        degrade=True,
    )
    with on_commit(execute=True):
        served = [client.chat.completions.create(**chat()).quota_rung for _ in range(3)]
    assert served[1:] in (["fallback", "cache"], ["cache", "cache"])  # a slow machine may
    # find the upstream slower than LLM_DEGRADE_AFTER_SECONDS for the first call
    with pytest.raises(llm.Deferred):
        client.chat.completions.create(**chat(messages=[{"role": "user", "content": "New"}]))
    moved = {
        rung: counted("quotas_degraded_requests_total", rung=rung) - before[rung] for rung in rungs
    }
    expected = {rung: served.count(rung) for rung in ("fallback", "cache")}
    assert moved == {**expected, "deferred": 1}
    assert counted("quotas_deferred_jobs_created_total") - jobs_before == 1
