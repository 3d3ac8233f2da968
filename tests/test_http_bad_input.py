"""Malformed requests to ``POST /v1/chat/completions`` are answered 4xx with a message that
names the problem, never 500, and never cost the user any of their budget.

Through the Django test client, which re-raises any exception a view lets escape, so a 500
would fail these tests loudly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

URL = "/v1/chat/completions"
GOOD = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def client(make_plan, make_user):
    user = make_user(plan=make_plan(tokens_per_hour=10_000, max_tokens_per_request=5_000))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}")
    return api


def post_raw(client: APIClient, raw: bytes | str, content_type: str = "application/json") -> Any:
    return client.generic("POST", URL, raw, content_type=content_type)


def assert_refused(response: Any, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    error = body["error"]
    assert error["message"] == body["detail"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    return error


def used(client: APIClient) -> int:
    return client.get("/quotas/me/").json()["used"]


def test_the_good_body_is_served(client):
    # The baseline every case below changes in one way.
    assert client.post(URL, GOOD, format="json").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"model": "gpt-4",}', b"not json", b"\xff\xfe\x00", b'{"model": "gpt-4"'],
)
def test_malformed_json_is_a_400(client, raw):
    assert_refused(post_raw(client, raw), 400, None, "not valid JSON")
    assert used(client) == 0


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[]", "Expected a dictionary, but got list"),
        (b"42", "Expected a dictionary, but got int"),
        (b'"text"', "Expected a dictionary, but got str"),
        (b"null", "No data provided"),
    ],
)
def test_a_body_that_is_not_an_object_is_a_400(client, raw, words):
    assert_refused(post_raw(client, raw), 400, None, words)


def test_an_empty_body_is_a_400_naming_the_model(client):
    assert_refused(post_raw(client, b""), 400, "model", "required")


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": None}, "messages", ("null",)),
        ({"messages": "Hello"}, "messages", ("list",)),
        ({"messages": {"role": "user"}}, "messages", ("list",)),
        ({"messages": []}, "messages", ("empty",)),
        ({"messages": ["Hello"]}, "messages[0]", ("dictionary",)),
        ({"messages": [{"content": "Hello"}]}, "messages[0].role", ("required",)),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role", ("valid",)),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ("string",)),
        ({"messages": [{"role": "user", "content": "a", "name": 7}]}, "messages[0].name", ()),
        ({"model": 5}, "model", ("string",)),
        ({"model": None}, "model", ("null",)),
        ({"stream": "yes"}, "stream", ("boolean",)),
        ({"stream": 1}, "stream", ("boolean",)),
        ({"stream_options": "usage"}, "stream_options", ("dictionary",)),
        ({"temperature": "hot"}, "temperature", ("number",)),
        ({"temperature": 3}, "temperature", ("less than or equal to 2",)),
        ({"user": 12}, "user", ("string",)),
        ({"stop": [1, 2]}, "stop", ("string",)),
        ({"n": 2}, "n", ("less than or equal to 1",)),
    ],
)
def test_a_known_field_of_the_wrong_type_is_a_400_naming_it(client, fields, param, words):
    body = {**GOOD, **fields}
    error = assert_refused(client.post(URL, body, format="json"), 400, param, *words)
    assert f"'{param}'" in error["message"]
    assert used(client) == 0


def test_missing_messages_is_a_400(client):
    assert_refused(client.post(URL, {"model": "gpt-4"}, format="json"), 400, "messages", "required")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (-5, "greater than or equal to 1"),
        (0, "greater than or equal to 1"),
        (2.5, "valid integer"),
        (10.0, "valid integer"),
        ("100", "valid integer"),
        (True, "valid integer"),
        (False, "valid integer"),
        ([100], "valid integer"),
    ],
)
def test_an_output_limit_must_be_a_positive_integer(client, field, value, words):
    response = client.post(URL, {**GOOD, field: value}, format="json")
    assert_refused(response, 400, field, words)
    assert used(client) == 0


def test_unknown_fields_are_ignored(client):
    body = {**GOOD, "logit_bias": {"50256": -100}, "tools": [], "metadata": {"a": "b"}}
    assert client.post(URL, body, format="json").status_code == 200


def test_a_3_mb_body_is_a_400_naming_the_limit(client):
    # Over the limit the quota estimator reads (QUOTAS["MAX_BODY_BYTES"], 1 MB by default) and
    # Django's upload limit (2.5 MB): refused from Content-Length before the body is parsed.
    huge = {**GOOD, "messages": [{"role": "user", "content": "x " * 1_500_000}]}
    raw = json.dumps(huge).encode()
    assert len(raw) > 3_000_000
    response = post_raw(client, raw)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "request_body_too_large"
    assert f"{len(raw)} bytes" in error["message"]
    assert "Retry-After" not in response
    assert used(client) == 0


def test_a_form_encoded_body_is_a_415(client):
    response = post_raw(client, "model=gpt-4", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert "application/x-www-form-urlencoded" in response.json()["detail"]


def test_a_get_is_a_405(client):
    assert client.get(URL).status_code == 405


# -- one vocabulary, bounds and cost (issue: hardening) ---------------------------------------
def test_the_gateway_and_the_app_use_one_400_vocabulary(client):
    # The gateway's own validation (before the throttle) and the app's estimator (in the
    # throttle) refuse with the same code, type and param for the same kind of problem.
    gateway = assert_refused(
        client.post(URL, {**GOOD, "max_tokens": -1}, format="json"), 400, "max_tokens"
    )
    parts = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    body = {**GOOD, "messages": [{"role": "user", "content": parts}]}
    app = assert_refused(client.post(URL, body, format="json"), 400, "messages[0].content[0].type")
    assert gateway["code"] == app["code"] == "invalid_request"


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"model": "gpt-4", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_deeply_nested_json_is_a_400(client, raw):
    error = assert_refused(post_raw(client, raw), 400, None, "levels deep")
    assert error["code"] == "invalid_request"
    assert used(client) == 0


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"max_tokens": 2**63}, "max_tokens", ("less than or equal to 1000000000",)),
        ({"max_completion_tokens": 2**64}, "max_completion_tokens", ("less than or equal",)),
        ({"seed": 2**63}, "seed", ("less than or equal",)),
        ({"model": "m" * 201}, "model", ("no more than 200 characters",)),
        ({"model": "gpt-4\r\nX-Injected: 1"}, "model", ("control characters",)),
        ({"messages": [{}] * 2049}, "messages", ("no more than 2048",)),
    ],
)
def test_figures_and_names_beyond_the_bounds_are_a_400(client, fields, param, words):
    assert_refused(client.post(URL, {**GOOD, **fields}, format="json"), 400, param, *words)
    assert used(client) == 0


def test_a_megabyte_of_empty_messages_is_refused_at_once(client):
    # 333,320 empty messages (a 1 MB body) took 27.8 s to answer 400 before.
    import time

    raw = json.dumps({"model": "gpt-4", "messages": [{}] * 333_320}, separators=(",", ":"))
    started = time.process_time()
    error = assert_refused(post_raw(client, raw), 400, "messages", "no more than 2048")
    assert time.process_time() - started < 1.0
    assert error["code"] == "invalid_request"


def test_validation_stops_at_the_first_bad_message(client):
    messages = [{"role": "user", "content": "Hi"}] * 2000 + [{"role": "wizard"}, {}]
    assert_refused(
        client.post(URL, {**GOOD, "messages": messages}, format="json"), 400, "messages[2000].role"
    )


def test_tools_count_in_the_prompt_of_the_fake_models_usage(client):
    tool = {"type": "function", "function": {"name": "lookup", "description": "Find a word."}}
    plain = client.post(URL, GOOD, format="json").json()["usage"]["prompt_tokens"]
    with_tool = client.post(URL, {**GOOD, "tools": [tool]}, format="json")
    assert with_tool.status_code == 200
    assert with_tool.json()["usage"]["prompt_tokens"] > plain
