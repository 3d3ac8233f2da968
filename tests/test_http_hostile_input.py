"""What a hostile or careless client sends to any quota-enforced endpoint (a DRF view with the
throttle, a plain view with the decorator): every such body is a 400 in the app's one
vocabulary (``error.code``, ``error.type``, ``error.param``), never a 500, never a charge.

Through the Django test client, which re-raises anything a view lets escape."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from rest_framework.test import APIClient

from quotas import services
from quotas.core.bounds import MAX_TOKENS

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.enforced_urls")]

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 92}
DEEP = b"[" * 1000 + b"]" * 1000
DEEP_IN_OBJECT = b'{"model": "gpt-4", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.fixture
def user(make_plan, make_user):
    return make_user(plan=make_plan(tokens_per_hour=10_000, max_tokens_per_request=6000))


@pytest.fixture
def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def web(user):
    client = Client()
    client.force_login(user)
    return client


def refused(response, param=None, code="invalid_request", *words):
    assert response.status_code == 400, response.content
    body = response.json()
    error = body["error"]
    assert (error["code"], error["type"], error["param"]) == (code, "invalid_request_error", param)
    assert error["message"] == body["detail"]
    for word in words:
        assert word in error["message"]
    return error


@pytest.mark.parametrize("raw", [DEEP, DEEP_IN_OBJECT, b'{"a":' * 3000 + b"1" + b"}" * 3000])
@pytest.mark.parametrize("url", ["/completion/", "/plain/"])
def test_deeply_nested_json_is_a_400_not_a_500(api, web, user, url, raw):
    client = api if url == "/completion/" else web
    response = client.post(url, raw, content_type="application/json")
    refused(response, None, "invalid_request", "levels deep")
    assert services.budget_for(user)["used"] == 0


def test_nesting_the_parser_accepts_but_the_bound_does_not_is_a_400(api):
    body = {**BODY, "tools": json.loads("[" * 100 + "]" * 100)}
    refused(api.post("/completion/", body, format="json"), None, "invalid_request", "64 levels")


@pytest.mark.parametrize("value", [2**63, 2**64 + 5, MAX_TOKENS + 1])
def test_max_tokens_beyond_the_bound_is_a_400_not_an_overflowed_413(api, user, value):
    # Before: a 413 with "requested": -9223372036854775808 (the figure overflowed in Redis).
    response = api.post("/completion/", {**BODY, "max_tokens": value}, format="json")
    refused(response, "max_tokens", "invalid_request", f"at most {MAX_TOKENS}")
    assert services.budget_for(user)["used"] == 0


def test_a_model_name_the_ledger_cannot_store_is_a_400_before_anything_is_reserved(api, user):
    for model in ["m" * 201, "gpt-4\r\nX-Injected: 1"]:
        response = api.post("/completion/", {**BODY, "model": model}, format="json")
        refused(response, "model", "invalid_request")
    assert services.budget_for(user)["used"] == 0


def test_refusals_name_the_field_like_openai(api, web):
    body = {**BODY, "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": 5}]}
    refused(api.post("/completion/", body, format="json"), "messages[1].content")
    image = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    body = {**BODY, "messages": [{"role": "user", "content": [image]}]}
    response = web.post("/plain/", body, content_type="application/json")
    refused(response, "messages[0].content[0].type", "invalid_request", "cannot be estimated")


def test_an_over_large_body_has_its_own_code_on_both_paths(api, web):
    huge = json.dumps({"prompt": "x" * 1_100_000})
    for client, url in [(api, "/completion/"), (web, "/plain/")]:
        response = client.post(url, huge, content_type="application/json")
        refused(response, None, "request_body_too_large", "byte limit")


def test_tools_are_charged_before_the_call(api, user):
    # 40,002 tokens hidden in a tool's description used to be charged 57-69 tokens.
    tool = {"type": "function", "function": {"name": "f", "description": " hello" * 40_002}}
    response = api.post("/completion/", {**BODY, "tools": [tool]}, format="json")
    assert response.status_code == 413
    assert response.json()["error"]["requested"] > 40_002


def test_the_python_api_holds_figures_and_names_to_the_same_bounds(user):
    from quotas.core.bounds import InvalidRequest

    for tokens in [2**63, MAX_TOKENS + 1, -1]:
        with pytest.raises(InvalidRequest):
            services.reserve(user, tokens)
    with pytest.raises(InvalidRequest, match="200 characters"):
        services.reserve(user, 10, model="m" * 201)
    assert services.budget_for(user)["used"] == 0
    reservation = services.reserve(user, 10, model="gpt-4")
    with pytest.raises(ValueError, match="at most"):
        services.settle(reservation, prompt_tokens=2**63)
    assert services.settle(reservation, total_tokens=7).actual_tokens == 7
