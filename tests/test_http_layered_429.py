"""The official ``openai`` client against the demo gateway on a real gunicorn server: a correct
429 for each kind of limit (the user's tokens and requests, a longer window, a team's pooled
budget, a global per-model limit, a monthly cost budget), naming the limit that refused, with
an exact ``Retry-After``; and headers that report the most restrictive limit and list every
policy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import openai
import pytest
from rest_framework.authtoken.models import Token

from quotas.core.tokens import count_chat_tokens, encoding_for_model
from quotas.models import GlobalLimit, ModelPrice, PlanLimit, Team, UserQuota
from tests.gateway_server import running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

MESSAGES = [{"role": "user", "content": "Say something about sliding windows."}]
PROMPT = count_chat_tokens(encoding_for_model("gpt-4"), MESSAGES)
BIG = 1_000_000


@pytest.fixture
def port(isolated_quotas: str, transactional_db: Any) -> Iterator[int]:
    with ExitStack() as stack:
        yield stack.enter_context(running_gateway(isolated_quotas))


@pytest.fixture
def account(make_plan: Any, make_user: Any) -> Callable[..., tuple[Any, str]]:
    def make(plan: Any = None, team: Team | None = None) -> tuple[Any, str]:
        user = make_user()
        UserQuota.objects.create(user=user, plan=plan or make_plan(tokens_per_hour=BIG), team=team)
        return user, Token.objects.create(user=user).key

    return make


def ask(port: int, token: str, model: str = "gpt-4", max_tokens: int = 100) -> Any:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=token, timeout=10, max_retries=0
    )
    return client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens
    )


def refusal(port: int, token: str, **fields: Any) -> tuple[dict[str, Any], Any]:
    with pytest.raises(openai.RateLimitError) as refused:
        ask(port, token, **fields)
    exc = refused.value
    return exc.body, exc.response.headers


def test_a_longer_window_of_the_plan(port, account, make_plan):
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="tokens", window_seconds=86_400, budget=500)
    _, token = account(plan)
    ask(port, token, max_tokens=300)
    body, headers = refusal(port, token, max_tokens=300)
    assert (body["type"], body["scope"], body["window"], body["limit"]) == (
        "tokens",
        "user",
        "1d",
        500,
    )
    assert int(headers["retry-after"]) >= 86_400 - 2  # the first request's bucket leaves then
    assert headers["x-ratelimit-limit-tokens"] == "500"  # the most restrictive token limit


def test_the_requests_of_a_plan(port, account, make_plan):
    plan = make_plan(tokens_per_hour=BIG, requests_per_minute=1)
    _, token = account(plan)
    ask(port, token)
    body, headers = refusal(port, token)
    assert (body["type"], body["window"], body["limit"], body["requested"]) == (
        "requests",
        "minute",
        1,
        1,
    )
    assert 1 <= int(headers["retry-after"]) <= 61


def test_a_teams_pooled_budget(port, account, make_plan):
    team = Team.objects.create(slug="acme", name="Acme", plan=make_plan(tokens_per_hour=400))
    (_, first), (_, second) = account(team=team), account(team=team)
    ask(port, first, max_tokens=300)
    body, headers = refusal(port, second, max_tokens=300)
    assert (body["scope"], body["type"], body["limit"]) == ("team", "tokens", 400)
    assert "team tokens per hour" in body["message"]
    assert '"team-tokens-hour";q=400;w=3600' in headers["ratelimit-policy"]


def test_a_global_limit_on_a_model(port, account):
    GlobalLimit.objects.create(
        name="TPM", metric="tokens", window_seconds=60, model="gpt-4*", budget=500
    )
    (_, first), (_, second) = account(), account()
    ask(port, first, max_tokens=300)
    body, headers = refusal(port, second, max_tokens=300)
    assert (body["scope"], body["model"], body["window"]) == ("global", "gpt-4*", "minute")
    assert 1 <= int(headers["retry-after"]) <= 61
    ask(port, second, model="gpt-3.5-turbo", max_tokens=300)  # another model: not counted


def test_a_monthly_cost_budget(port, account, make_plan):
    ModelPrice.objects.create(
        model="gpt-4", input_per_million=Decimal(30), output_per_million=Decimal(60)
    )
    plan = make_plan(tokens_per_hour=BIG)
    PlanLimit.objects.create(plan=plan, metric="cost", period="month", budget=30_000)  # 3 cents
    _, token = account(plan)
    ask(port, token, max_tokens=300)  # settled: PROMPT x 30 + 300 x 60 micro-dollars
    body, headers = refusal(port, token, max_tokens=300)
    spent = PROMPT * 30 + 300 * 60
    assert (body["type"], body["window"], body["limit"]) == ("cost", "month", 30_000)
    assert body["remaining"] == 30_000 - spent
    assert body["requested"] == PROMPT * 30 + 300 * 60
    assert '"cost-month";q=30000' in headers["ratelimit-policy"]
    assert int(headers["retry-after"]) >= 1  # until the month ends
