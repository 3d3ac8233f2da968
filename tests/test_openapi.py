"""The OpenAPI schema the demo serves (drf-spectacular): every ``quotas`` endpoint and
``/v1/chat/completions`` with their error responses, real responses (200s and each error
kind) valid against it, no 500 for generated malformed inputs, and Swagger UI served from
local static files (no CDN)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from rest_framework.test import APIClient

from quotas.models import DeferredJob, Plan
from tests.conftest import quotas_settings
from tests.test_gateway import BODY, URL, bearer_client

pytestmark = pytest.mark.django_db

ERRORS = {"400", "401", "403", "413", "429", "503"}


@pytest.fixture(scope="module")
def schema(django_db_blocker: Any) -> dict[str, Any]:
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def operation_path(path: str) -> str:
    """The schema's path template of a concrete path (``/quotas/users/3/`` ->
    ``/quotas/users/{user_id}/``; a query string is not part of it)."""
    path = re.sub(r"/users/[^/]+/", "/users/{user_id}/", path.split("?")[0])
    return re.sub(r"/jobs/[^/]+/", "/jobs/{job_id}/", path)


def assert_documented(schema: dict[str, Any], method: str, path: str, response: Any) -> None:
    """``response`` has a status the operation documents, and its JSON body is valid."""
    operation = schema["paths"][operation_path(path)][method]
    status = str(response.status_code)
    assert status in operation["responses"], (path, status, response.content[:300])
    documented = operation["responses"][status]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**documented, "components": schema["components"]})
    errors = list(validator.iter_errors(response.json()))
    assert not errors, (path, status, response.json(), [e.message for e in errors])


@pytest.fixture
def plan(make_plan):
    return make_plan(slug="documented", tokens_per_hour=1500, max_tokens_per_request=1480)


def test_every_quotas_endpoint_and_the_v1_endpoint_are_described(schema):
    paths = set(schema["paths"])
    assert {
        "/quotas/me/",
        "/quotas/me/usage/",
        "/quotas/plans/",
        "/quotas/users/{user_id}/",
        "/quotas/health/",
        "/quotas/jobs/{job_id}/",
        "/quotas/limits/",
        "/v1/chat/completions",
    } <= paths
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) >= ERRORS
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    me = schema["paths"]["/quotas/me/"]["get"]["responses"]
    assert {"200", "401", "403", "409"} <= set(me)


def test_chat_responses_of_every_kind_match_the_schema(
    schema, make_user, plan, isolated_quotas, dead_redis_url
):
    client = bearer_client(make_user(plan=plan))
    check = lambda response: assert_documented(schema, "post", URL, response)  # noqa: E731
    ok = client.post(URL, {**BODY, "max_tokens": 40}, format="json")
    assert ok.status_code == 200
    check(ok)
    for body, status in (
        ({**BODY, "max_tokens": "40"}, 400),
        ({**BODY, "max_tokens": 1500}, 413),
        ({**BODY, "max_tokens": 1420}, 429),
    ):
        response = client.post(URL, body, format="json")
        assert response.status_code == status
        check(response)
    anonymous = APIClient().post(URL, BODY, format="json")
    assert anonymous.status_code == 401
    check(anonymous)
    dead = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": dead_redis_url}
    dead["OPTIONS"] = {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25}
    closed = quotas_settings(
        KEY_PREFIX=isolated_quotas, CACHE_ALIAS="dead", FAILURE_POLICY="closed"
    )
    with override_settings(CACHES={**settings.CACHES, "dead": dead}, QUOTAS=closed):
        unavailable = client.post(URL, BODY, format="json")
    assert unavailable.status_code == 503
    check(unavailable)


def test_quotas_endpoint_responses_match_the_schema(schema, make_user, plan):
    member = make_user(plan=plan, username="member")
    client = bearer_client(member)
    staff = APIClient()
    staff.force_login(make_user(is_staff=True, is_superuser=True, username="root"))
    job = DeferredJob.objects.create(
        user=member, provider="openai", request=BODY, expires_at=timezone.now() + timedelta(1)
    )
    calls = [
        (client, "/quotas/me/", 200),
        (APIClient(), "/quotas/me/", 401),
        (client, "/quotas/me/usage/?period=month", 200),
        (client, "/quotas/me/usage/?period=year", 400),
        (APIClient(), "/quotas/me/usage/", 401),
        (client, "/quotas/plans/", 200),
        (staff, f"/quotas/users/{member.pk}/", 200),
        (client, f"/quotas/users/{member.pk}/", 403),
        (staff, "/quotas/users/999999999/", 404),
        (client, f"/quotas/jobs/{job.pk}/", 200),
        (client, f"/quotas/jobs/{uuid.uuid4()}/", 404),
        (staff, "/quotas/limits/", 200),
        (client, "/quotas/limits/", 403),
    ]
    for who, path, status in calls:
        response = who.get(path)
        assert response.status_code == status, (path, response.content)
        assert_documented(schema, "get", path, response)
    health = APIClient().get("/quotas/health/")
    assert_documented(schema, "get", "/quotas/health/", health)
    assert not Plan.objects.filter(is_default=True).exists()
    no_plan = bearer_client(make_user(username="planless")).get("/quotas/me/")
    assert no_plan.status_code == 409
    assert_documented(schema, "get", "/quotas/me/", no_plan)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES = JSON | st.fixed_dictionaries(
    {"model": JSON | st.just("gpt-4"), "messages": JSON | st.just(BODY["messages"])},
    optional={
        "max_tokens": JSON | st.integers(),
        "stream": JSON,
        "temperature": JSON,
        "stop": JSON,
        "n": JSON,
    },
)


@hypothesis_settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES)
def test_generated_malformed_chat_bodies_get_a_documented_answer_never_a_500(
    schema, make_user, plan, body
):
    client = bearer_client(make_user(plan=plan, username=f"fuzz-{uuid.uuid4().hex[:8]}"))
    response = client.post(URL, body, format="json")
    assert response.status_code < 500
    if response.get("Content-Type", "").startswith("application/json"):
        assert_documented(schema, "post", URL, response)


@pytest.mark.parametrize(
    "path", ["/quotas/users/99999999999999999999999/", "/quotas/users/-1/", "/quotas/jobs/nope/"]
)
def test_malformed_path_parameters_are_client_errors(make_user, path):
    staff = APIClient()
    staff.force_login(make_user(is_staff=True, is_superuser=True, username="root"))
    assert staff.get(path).status_code == 404


def test_swagger_ui_is_served_from_local_static_files():
    response = APIClient().get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources, page[:500]
    assert not [s for s in sources if s.startswith(("http:", "https:", "//"))], sources
    assets = [s for s in sources if s.startswith(settings.STATIC_URL) or "/static/" in s]
    assert any("swagger-ui-bundle.js" in s for s in assets), sources
    for asset in assets:
        relative = asset.split("static/", 1)[1].split("?")[0]
        assert finders.find(relative), asset  # collectstatic ships it; WhiteNoise serves it


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs a chromium binary")
def test_swagger_ui_renders_every_operation_in_headless_chromium(isolated_quotas, tmp_path):
    """Through a real server, with the static files collected as ``make run`` does, and no
    network: the page's scripts come from the sidecar's copy, and they render the schema."""
    from tests.gateway_server import running_gateway

    env = {**os.environ, "VAR_DIR": str(tmp_path)}
    manage = [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"]
    subprocess.run(manage, cwd=settings.BASE_DIR, env=env, check=True, timeout=120)
    with running_gateway(isolated_quotas, workers=1, VAR_DIR=str(tmp_path)) as port:
        dom = subprocess.run(
            [
                "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000",
                "--dump-dom", f"http://127.0.0.1:{port}/api/docs/",
            ],
            capture_output=True, text=True, timeout=90,
        ).stdout  # fmt: skip
    shown = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert shown == {
        "/quotas/me/",
        "/quotas/me/usage/",
        "/quotas/plans/",
        "/quotas/users/{user_id}/",
        "/quotas/health/",
        "/quotas/jobs/{job_id}/",
        "/quotas/limits/",
        "/v1/chat/completions",
    }
