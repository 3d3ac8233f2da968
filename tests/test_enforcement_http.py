"""The throttle and the middleware through HTTP (Django test client, real Redis)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from quotas import services
from quotas.core.types import ceil_seconds
from quotas.models import UsageRecord
from tests.support import redis_ms

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 92}
ESTIMATE = 8 + 92  # "Hello" as a chat message is 8 prompt tokens


@pytest.fixture
def user(make_plan, make_user):
    return make_user(plan=make_plan(slug="basic", tokens_per_hour=1000, max_tokens_per_request=600))


@pytest.fixture
def client(user):
    api = APIClient()
    api.force_authenticate(user)
    return api


def post(client, url, body=BODY, **kwargs):
    return client.post(url, body, format="json", **kwargs)


def assert_reset_matches(header: str, reset_seconds: float, elapsed_ms: int) -> None:
    """``X-RateLimit-Reset`` (whole seconds, rounded up, when the response was made) against
    a budget's ``reset_seconds`` read up to ``elapsed_ms`` (Redis's clock) from that moment:
    the header is what the budget said then, so it lies in this range, whatever the delay."""
    low, high = (
        ceil_seconds(reset_seconds - elapsed_ms / 1000),
        ceil_seconds(reset_seconds + elapsed_ms / 1000),
    )
    assert low <= int(header) <= high, (header, reset_seconds, elapsed_ms)


def test_a_served_request_is_settled_from_its_usage_block(client, user, on_commit, redis_client):
    started = redis_ms(redis_client)
    with on_commit(execute=True):
        response = post(client, "/completion/")
    assert response.status_code == 200
    assert response["X-RateLimit-Limit"] == "1000"
    assert response["X-RateLimit-Remaining"] == "960"  # settled at 40, not the 100 estimate
    assert response["x-ratelimit-remaining-tokens"] == "960"
    assert response["RateLimit-Policy"] == '"tokens";q=1000;w=3600'
    assert response["RateLimit"].startswith('"tokens";r=960;t=')
    me = client.get("/quotas/me/").json()
    assert (me["used"], me["remaining"]) == (40, 960)
    assert_reset_matches(
        response["X-RateLimit-Reset"], me["reset_seconds"], redis_ms(redis_client) - started
    )
    record = UsageRecord.objects.get()
    assert (record.estimated_tokens, record.actual_tokens, record.status) == (
        ESTIMATE,
        40,
        "settled",
    )


def test_over_budget_is_a_429_the_openai_client_understands(client):
    for _ in range(10):
        assert post(client, "/no-usage/").status_code == 200
    response = post(client, "/no-usage/")
    assert response.status_code == 429
    body = response.json()
    error = body["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert (error["limit"], error["remaining"], error["requested"]) == (1000, 0, ESTIMATE)
    assert body["detail"] == error["message"]
    retry = int(response["Retry-After"])
    assert retry == error["retry_after_seconds"]
    assert int(response["retry-after-ms"]) <= retry * 1000
    assert response["X-RateLimit-Remaining"] == "0"


def test_a_request_that_can_never_fit_is_a_413_without_retry_after(client):
    response = post(client, "/no-usage/", {**BODY, "max_tokens": 700})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "Retry-After" not in response
    assert client.get("/quotas/me/").json()["used"] == 0


def test_a_failed_view_refunds_everything(client, on_commit):
    with on_commit(execute=True):
        response = post(client, "/failing/")
    assert response.status_code == 502
    assert response["X-RateLimit-Remaining"] == "1000"  # the headers count the refund
    assert client.get("/quotas/me/").json()["used"] == 0
    assert UsageRecord.objects.get().status == "refunded"


def test_a_4xx_from_the_view_after_the_throttle_reserved_is_refunded(client, on_commit):
    with on_commit(execute=True):
        response = post(client, "/rejecting/")
    assert response.status_code == 404
    assert response["X-RateLimit-Remaining"] == "1000"
    assert client.get("/quotas/me/").json()["used"] == 0
    row = UsageRecord.objects.get()
    assert (row.status, row.estimated_tokens, row.actual_tokens) == ("refunded", ESTIMATE, 0)


def test_a_2xx_without_usage_keeps_the_estimate(client):
    post(client, "/no-usage/")
    assert client.get("/quotas/me/").json()["used"] == ESTIMATE


def test_an_explicit_settle_wins_over_the_usage_block(client):
    post(client, "/explicit/")
    assert client.get("/quotas/me/").json()["used"] == 7


@pytest.mark.django_db(transaction=True)
def test_a_stream_whose_view_settled_is_not_settled_again_when_it_ends(client):
    store = services.get_store()
    with mock.patch.object(store, "settle", wraps=store.settle) as settle:
        response = post(client, "/explicit-stream/", {**BODY, "stream_usage": True})
        b"".join(response.streaming_content)
        response.close()
    assert settle.call_count == 1  # the view's own
    assert client.get("/quotas/me/").json()["used"] == 7


def test_a_view_can_give_its_own_estimate(client):
    post(client, "/own-estimate/", {"anything": True})
    assert client.get("/quotas/me/").json()["used"] == 123


def test_the_default_output_allowance_comes_from_the_plan(client):
    post(client, "/no-usage/", {"messages": BODY["messages"]})  # no max_tokens
    assert client.get("/quotas/me/").json()["used"] == 8 + 256


# A closed stream ends the request, and Django then closes the database connection: these
# tests run outside a test transaction so the connection simply reopens.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("with_usage", [True, False])
def test_streams_settle_when_they_end(client, with_usage):
    response = post(client, "/stream/", {**BODY, "stream_usage": with_usage})
    assert client.get("/quotas/me/").json()["used"] == ESTIMATE  # not settled yet
    b"".join(response.streaming_content)
    response.close()
    expected = 40 if with_usage else 8 + 3  # prompt + "hello world again"
    assert client.get("/quotas/me/").json()["used"] == expected


@pytest.mark.django_db(transaction=True)
def test_a_stream_the_client_abandons_is_settled_with_what_was_produced(client):
    response = post(client, "/stream/", BODY)
    next(iter(response.streaming_content))  # one chunk, then the client goes away
    response.close()
    assert client.get("/quotas/me/").json()["used"] == 8 + 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "JSON parse error"),
        (json.dumps({"messages": "hi"}).encode(), "'messages' must be a non-empty list"),
        (json.dumps({**BODY, "max_tokens": -3}).encode(), "'max_tokens' must be a positive"),
    ],
)
def test_bad_bodies_are_400_with_a_message(client, raw, message):
    response = client.post("/completion/", raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert message in response.json()["error"]["message"]


def test_a_huge_body_is_refused_before_parsing(client):
    huge = json.dumps({"prompt": "x" * 1_100_000})
    response = client.post("/completion/", huge, content_type="application/json")
    assert response.status_code == 400
    assert "byte limit" in response.json()["detail"]


def test_anonymous_requests_are_401_by_default():
    response = post(APIClient(), "/open/")
    assert response.status_code == 401


def test_anonymous_requests_can_have_a_plan_keyed_by_address(make_plan, quota_config):
    make_plan(slug="anon", tokens_per_hour=150)
    quota_config(ANONYMOUS_PLAN="anon")
    first = post(APIClient(), "/open/", REMOTE_ADDR="10.1.1.1")
    assert first.status_code == 200
    assert post(APIClient(), "/open/", REMOTE_ADDR="10.1.1.1").status_code == 200  # 40 each
    assert (
        post(APIClient(), "/open/", {**BODY, "max_tokens": 140}, REMOTE_ADDR="10.1.1.1").status_code
        == 429
    )
    assert post(APIClient(), "/open/", REMOTE_ADDR="10.2.2.2").status_code == 200


def test_plain_views_opt_in_with_the_decorator(user, make_user):
    from django.test import Client

    web = Client()
    web.force_login(user)
    response = web.post("/plain/", BODY, content_type="application/json")
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "960"
    assert web.post("/plain/", b"{bad", content_type="application/json").status_code == 400
    assert web.post("/plain-fixed/").status_code == 200
    assert services.budget_for(user)["used"] == 40 + 50
    assert Client().post("/plain/", BODY, content_type="application/json").status_code == 401


@pytest.fixture
def web(user):
    """A plain Django test client logged in as ``user`` (for decorator-enforced views)."""
    from django.test import Client

    web = Client()
    web.force_login(user)
    return web


def test_a_4xx_from_a_decorated_view_is_refunded(web, user, on_commit):
    with on_commit(execute=True):
        response = web.post("/plain-rejecting/", BODY, content_type="application/json")
    assert response.status_code == 422
    assert response["X-RateLimit-Remaining"] == "1000"
    assert services.budget_for(user)["used"] == 0
    assert UsageRecord.objects.get().status == "refunded"


def test_a_decorated_view_over_budget_is_the_middlewares_429(web):
    assert web.post("/plain-heavy/").status_code == 200
    assert web.post("/plain-heavy/").status_code == 200  # 800 of 1000
    response = web.post("/plain-heavy/")
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert (error["limit"], error["remaining"], error["requested"]) == (1000, 200, 400)
    assert response.json()["detail"] == error["message"]
    retry = int(response["Retry-After"])
    assert retry == error["retry_after_seconds"] >= 1
    assert (retry - 1) * 1000 < int(response["retry-after-ms"]) <= retry * 1000
    assert response["X-RateLimit-Remaining"] == "200"
    assert response["x-ratelimit-remaining-tokens"] == "200"
    assert response["RateLimit-Policy"] == '"tokens";q=1000;w=3600'


def test_a_decorated_view_over_the_per_request_cap_is_the_middlewares_413(web, user):
    response = web.post("/plain/", {**BODY, "max_tokens": 700}, content_type="application/json")
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["limit"], error["requested"]) == ("request_too_large", 600, 708)
    assert "Retry-After" not in response and "retry-after-ms" not in response
    assert services.budget_for(user)["used"] == 0


def test_a_decorated_view_for_a_user_without_a_plan_is_the_middlewares_403(make_user):
    from django.test import Client

    web = Client()
    web.force_login(make_user())
    response = web.post("/plain-fixed/")
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "quota_not_configured"
    assert "no default plan" in error["message"]


def test_a_decorated_view_with_redis_down_and_fail_closed_is_the_middlewares_503(
    web, quota_config, dead_cache
):
    quota_config(CACHE_ALIAS=dead_cache, FAILURE_POLICY="closed")
    response = web.post("/plain-fixed/")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "quota_unavailable"
    assert int(response["Retry-After"]) >= 1


def test_requests_per_minute_headers_and_refusal(make_plan, make_user, redis_client):
    user = make_user(plan=make_plan(tokens_per_hour=100_000, requests_per_minute=2))
    api = APIClient()
    api.force_authenticate(user)
    started = redis_ms(redis_client)
    first = post(api, "/no-usage/")
    assert first["x-ratelimit-limit-requests"] == "2"
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert first["RateLimit-Policy"] == '"tokens";q=100000;w=3600, "requests";q=2;w=60'
    post(api, "/no-usage/")
    refused = post(api, "/no-usage/")
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "requests"
    finished = redis_ms(redis_client)
    # The first request's 1 s bucket leaves 61 s after it starts; the first request and the
    # refusal were both decided between `started` and `finished` (Redis's clock).
    earliest = ceil_seconds(((started // 1000 + 61) * 1000 - finished) / 1000)
    latest = ceil_seconds(((finished // 1000 + 61) * 1000 - started) / 1000)
    assert earliest <= int(refused["Retry-After"]) <= latest


def test_a_user_without_a_plan_gets_a_clear_403(make_user):
    api = APIClient()
    api.force_authenticate(make_user())
    response = post(api, "/completion/")
    assert response.status_code == 403
    assert "no default plan" in response.json()["detail"]


def test_fail_closed_answers_503_with_retry_after(client, quota_config, dead_cache):
    quota_config(CACHE_ALIAS=dead_cache, FAILURE_POLICY="closed")
    response = post(client, "/completion/")
    assert response.status_code == 503
    assert int(response["Retry-After"]) >= 1


def test_fail_open_serves_marks_the_response_and_keeps_the_ledger(
    client, quota_config, on_commit, dead_cache
):
    quota_config(CACHE_ALIAS=dead_cache)
    with on_commit(execute=True):
        response = post(client, "/completion/")
    too_large = post(client, "/completion/", {**BODY, "max_tokens": 700})
    assert response.status_code == 200
    assert response["X-Quota-Degraded"] == "redis-unavailable"
    assert "X-RateLimit-Remaining" not in response
    assert too_large.status_code == 413  # the per-request cap needs no Redis
    record = UsageRecord.objects.get()
    assert (record.status, record.actual_tokens) == ("degraded", 40)


# -- each refusal speaks in the units of the limit that refused ------------------------------
def test_a_requests_per_minute_refusal_gives_request_figures(make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=20_000, requests_per_minute=2))
    api = APIClient()
    api.force_authenticate(user)
    post(api, "/no-usage/")
    post(api, "/no-usage/")
    error = post(api, "/no-usage/").json()["error"]
    assert (error["type"], error["limit"], error["remaining"], error["requested"]) == (
        "requests",
        2,
        0,
        1,
    )
    assert "requested 1 request, 0 of 2 requests per minute remaining" in error["message"]
    assert "20000" not in error["message"]


def test_a_concurrency_refusal_gives_concurrency_figures(make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=20_000, max_concurrent_requests=1))
    services.reserve(user, 10)  # a request in flight
    api = APIClient()
    api.force_authenticate(user)
    response = post(api, "/no-usage/")
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["limit"], error["remaining"], error["requested"]) == (
        "concurrency",
        1,
        0,
        1,
    )
    assert "0 of 1 concurrent requests free" in error["message"]
    assert response["Retry-After"] == "1"


def test_a_token_refusal_keeps_token_figures(client):
    for _ in range(10):
        post(client, "/no-usage/")
    error = post(client, "/no-usage/").json()["error"]
    assert (error["type"], error["limit"], error["remaining"], error["requested"]) == (
        "tokens",
        1000,
        0,
        ESTIMATE,
    )
    assert f"requested {ESTIMATE} tokens, 0 of 1000 tokens remaining" in error["message"]


def test_a_413_names_the_cap_and_offers_no_retry(client):
    response = post(client, "/completion/", {**BODY, "max_tokens": 700})
    assert response.status_code == 413
    assert set(response.json()["error"]) == {"code", "type", "message", "limit", "requested"}
    assert "Retry-After" not in response


# -- debt is shown, never a negative remaining ----------------------------------------------
def test_usage_beyond_the_limit_is_debt_and_remaining_stays_at_zero(client, user):
    services.settle(services.reserve(user, 100), total_tokens=1_300)
    me = client.get("/quotas/me/").json()
    assert (me["used"], me["remaining"], me["debt"]) == (1_300, 0, 300)
    response = post(client, "/completion/")
    assert response.status_code == 429
    assert response["X-RateLimit-Remaining"] == "0"
    assert response.json()["error"]["remaining"] == 0


def test_without_debt_the_debt_is_zero(client):
    assert client.get("/quotas/me/").json()["debt"] == 0


# -- anonymous clients: 401 with a challenge, or 403 without one (DRF's rule) ------------------
def test_an_anonymous_plain_view_request_is_a_401_with_the_challenge():
    from django.test import Client

    response = Client().post("/plain/", BODY, content_type="application/json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"  # the demo's first authentication class
    assert response.json()["error"]["code"] == "not_authenticated"


def test_under_session_authentication_an_anonymous_request_is_a_403():
    from django.test import Client

    session_only = {
        "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"]
    }
    with override_settings(REST_FRAMEWORK=session_only):
        response = Client().post("/plain/", BODY, content_type="application/json")
    assert response.status_code == 403
    assert "WWW-Authenticate" not in response
    assert response.json()["error"]["code"] == "not_authenticated"


# -- chunked bodies --------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["/completion/", "/plain/"])
def test_a_chunked_body_django_reads_as_empty_is_a_411(url, user):
    from django.test import Client

    web = Client()
    web.force_login(user)
    # What a WSGI server hands Django for a chunked body: no Content-Length.
    response = web.generic(
        "POST", url, b"", content_type="application/json", HTTP_TRANSFER_ENCODING="chunked"
    )
    assert response.status_code == 411
    error = response.json()["error"]
    assert error["code"] == "length_required"
    assert "Content-Length" in error["message"]
    assert services.budget_for(user)["used"] == 0


def test_a_view_with_its_own_estimate_takes_a_chunked_request(client):
    response = client.generic("POST", "/own-estimate/", b"", HTTP_TRANSFER_ENCODING="chunked")
    assert response.status_code == 200


# -- anonymous clients behind trusted proxies --------------------------------------------------
def anonymous(remote: str, forwarded: str | None = None) -> int:
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return post(APIClient(), "/open/", {**BODY, "max_tokens": 130}, **extra).status_code


@pytest.fixture
def anonymous_plan(make_plan, quota_config):
    make_plan(slug="anon", tokens_per_hour=150)  # 138 reserved, 40 used: one request fits

    def configure(**settings):
        quota_config(ANONYMOUS_PLAN="anon", **settings)

    return configure


def test_behind_one_trusted_proxy_each_client_has_its_own_budget(anonymous_plan):
    anonymous_plan(NUM_PROXIES=1)
    proxy = "10.0.0.1"
    assert anonymous(proxy, "203.0.113.7") == 200
    assert anonymous(proxy, "203.0.113.7") == 429  # the same client
    assert anonymous(proxy, "198.51.100.9") == 200  # another client behind the same proxy
    # A client's own X-Forwarded-For entries come first: the proxy appends what it saw.
    assert anonymous(proxy, "1.2.3.4, 203.0.113.8") == 200
    assert anonymous(proxy, "5.6.7.8, 203.0.113.8") == 429


def test_two_proxies_key_by_the_address_the_outer_one_saw(anonymous_plan):
    anonymous_plan(NUM_PROXIES=2)
    assert anonymous("10.0.0.1", "203.0.113.7, 172.16.0.1") == 200
    assert anonymous("10.0.0.1", "203.0.113.7, 172.16.0.2") == 429  # same client, other CDN node
    assert anonymous("10.0.0.1", "198.51.100.9, 172.16.0.1") == 200  # another client


def test_without_num_proxies_forwarded_for_is_ignored(anonymous_plan):
    anonymous_plan()
    assert anonymous("10.0.0.1", "203.0.113.7") == 200
    assert anonymous("10.0.0.1", "198.51.100.9") == 429  # spoofable: never trusted by default


def test_a_forwarded_entry_that_is_no_address_falls_back_to_the_peer(anonymous_plan):
    anonymous_plan(NUM_PROXIES=1)
    assert anonymous("10.0.0.1", "not-an-address") == 200
    assert anonymous("10.0.0.1", "other-garbage") == 429  # both keyed by 10.0.0.1


def test_ipv6_clients_are_keyed_by_their_64_network(anonymous_plan):
    anonymous_plan()
    assert anonymous("2001:db8:1:2::10") == 200
    assert anonymous("2001:db8:1:2:ffff::99") == 429  # same /64
    assert anonymous("2001:db8:1:3::10") == 200
