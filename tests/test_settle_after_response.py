"""``SETTLE_AFTER_RESPONSE``: under WSGI the middleware settles a response once it has been
sent (when the server closes it), so the client never waits for the settle's round trip; the
headers still tell the budget after the request's real cost. Real Redis, the test client
(which closes every response as a WSGI server does)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from django.http.response import HttpResponseBase
from rest_framework.test import APIClient

from quotas import checks, services
from quotas.conf import DEFAULTS
from quotas.models import ModelPrice, PlanLimit

from .test_enforcement_http import BODY, ESTIMATE

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]


class Seen(list):
    """What ``probe`` read each time a response began to close (the moment a WSGI server has
    sent it)."""

    probe: Any


def client_of(user: Any) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


@pytest.fixture
def at_close_list(monkeypatch: Any) -> Seen:
    """Every response's close, probed first."""
    seen = Seen()
    original = HttpResponseBase.close

    def close(self: HttpResponseBase) -> None:
        seen.append(seen.probe())
        original(self)

    monkeypatch.setattr(HttpResponseBase, "close", close)
    return seen


def remaining_at_close(seen: Seen, user: Any) -> Seen:
    seen.probe = lambda: services.budget_for(user)["remaining"]
    return seen


@pytest.fixture
def after(quota_config: Any) -> None:
    quota_config(SETTLE_AFTER_RESPONSE=True)


def test_off_by_default():
    assert DEFAULTS["SETTLE_AFTER_RESPONSE"] is False


def test_the_settle_runs_once_the_response_is_sent(make_plan, make_user, at_close_list, after):
    user = make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))
    seen = remaining_at_close(at_close_list, user)
    response = client_of(user).post("/completion/", BODY, format="json")
    assert response.status_code == 200
    assert seen == [1000 - ESTIMATE]  # sent while Redis still held the estimate ...
    assert services.budget_for(user)["remaining"] == 960  # ... then settled at its usage
    # The headers tell the budget after the request's real cost all the same.
    assert response["X-RateLimit-Remaining"] == "960"
    assert response["RateLimit"].startswith('"tokens-hour";r=960;t=')


def test_a_failed_request_is_refunded_once_sent(make_plan, make_user, at_close_list, after):
    user = make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))
    seen = remaining_at_close(at_close_list, user)
    response = client_of(user).post("/failing/", BODY, format="json")
    assert response.status_code == 502
    assert seen == [1000 - ESTIMATE]
    assert services.budget_for(user)["remaining"] == 1000
    assert response["X-RateLimit-Remaining"] == "1000"


def test_off_settles_before_the_response_is_sent(make_plan, make_user, at_close_list, quota_config):
    quota_config(SETTLE_AFTER_RESPONSE=False)
    user = make_user(plan=make_plan(tokens_per_hour=1000, max_tokens_per_request=600))
    seen = remaining_at_close(at_close_list, user)
    response = client_of(user).post("/completion/", BODY, format="json")
    assert seen == [960]
    assert response["X-RateLimit-Remaining"] == "960"


def test_a_request_holding_a_concurrency_slot_settles_before_it_is_sent(
    make_plan, make_user, at_close_list, after
):
    # The client's next request must find the slot free.
    plan = make_plan(tokens_per_hour=1000, max_tokens_per_request=600, max_concurrent_requests=1)
    user = make_user(plan=plan)
    seen = remaining_at_close(at_close_list, user)
    client = client_of(user)
    for _ in range(3):
        assert client.post("/completion/", BODY, format="json").status_code == 200
    assert seen == [960, 920, 880]


def test_cost_limits_are_told_after_the_real_cost_too(make_plan, make_user, quota_config):
    """The same request, settled after and before its response: the same headers."""
    ModelPrice.objects.create(
        model="gpt-4*", input_per_million=Decimal("30"), output_per_million=Decimal("60")
    )
    policies = []
    for after in (True, False):
        quota_config(SETTLE_AFTER_RESPONSE=after)
        plan = make_plan(tokens_per_hour=1000, max_tokens_per_request=600)
        PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=1_000_000)
        response = client_of(make_user(plan=plan)).post("/completion/", BODY, format="json")
        policies.append(re.sub(r";t=\d+", "", response["RateLimit"]))
    assert policies[0] == policies[1]
    # The estimate's cost is no longer counted: 11 prompt and 29 completion tokens are.
    assert f"r={1_000_000 - (11 * 30 + 29 * 60)}" in policies[0]


def test_the_setting_must_be_a_boolean(quota_config):
    quota_config(SETTLE_AFTER_RESPONSE="yes")
    errors = [e for e in checks.check_settings() if e.id == "quotas.E005"]
    assert [e.msg for e in errors] == [
        checks.E005_MSG.format(key="SETTLE_AFTER_RESPONSE", rule="True or False", value="yes")
    ]
