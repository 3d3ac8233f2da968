"""``GET /quotas/limits/``: what every process learnt of each provider, for staff only."""

from __future__ import annotations

import openai
import pytest
from rest_framework.test import APIClient

from quotas import llm
from tests.llm.conftest import chat

pytestmark = pytest.mark.django_db(transaction=True)


def test_staff_see_each_providers_learned_state(
    client, provider, make_user, fresh_upstream, fast, quota_config
):
    quota_config(LLM_DEADLINE_SECONDS=0.5, PROVIDER_BACKOFF_SECONDS=1.5)
    staff = APIClient()
    staff.force_authenticate(make_user(is_staff=True))
    fresh_upstream.control(mode="fail", fail_status=429)
    with pytest.raises((openai.RateLimitError, llm.ProviderRefused)):  # held back: 1.5 s
        client.chat.completions.create(**chat())
    [state] = staff.get("/quotas/limits/").json()["providers"]
    assert (state["provider"], state["model"]) == (provider, "gpt-4o")
    assert state["mode"] == "backing off" and 1 < state["backoff_seconds"] <= 1.5
    assert state["adaptive_rate"] > 0 and state["rate_limited"] == 1

    quota_config(LLM_DEADLINE_SECONDS=10.0)  # the call waits out the backoff, then its
    # answer lifts the rate (one call in 5 s met the 429: that rate is soon back)
    fresh_upstream.control(mode="normal")
    client.chat.completions.create(**chat())
    [state] = staff.get("/quotas/limits/").json()["providers"]
    assert state["mode"] == "normal" and state["adaptive_rate"] is None
    # What the upstream said in its last answer: 999 left, or fewer when a loaded machine timed
    # out an attempt the upstream served and the call sent it again.
    served = fresh_upstream.stats()["served"]
    assert state["requests"]["limit"] == 1000 and state["requests"]["remaining"] == 1000 - served
    assert state["tokens"]["limit"] == 1_000_000
    assert state["breaker"] == {"state": "closed", "failures": 0, "retry_after": 0.0}
    assert (state["answers"], state["rate_limited"], state["in_flight"]) == (1, 1, 0)

    someone = APIClient()
    someone.force_authenticate(make_user())
    assert someone.get("/quotas/limits/").status_code == 403
    assert APIClient().get("/quotas/limits/").status_code in (401, 403)
