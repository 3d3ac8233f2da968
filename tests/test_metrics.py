"""Prometheus metrics: a scrape of the demo's ``/metrics`` parses with Prometheus's own text
parser, and its figures move when traffic flows through the real gateway, throttle and
middleware (Django's test client, real Redis); who may scrape; many processes summed under
``PROMETHEUS_MULTIPROC_DIR``; the app without ``prometheus_client``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from quotas import services
from tests.conftest import quotas_settings
from tests.test_gateway import BODY, URL, bearer_client

pytestmark = pytest.mark.django_db

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by its name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(autouse=True)
def fresh_label_caps(monkeypatch):
    """Label values seen so far start empty: a process that ran other tests first may have
    seen ``MAX_LABEL_VALUES`` plans already, and would count this test's plan as "other"."""
    from quotas import telemetry

    monkeypatch.setattr(telemetry, "_seen", {})


@pytest.fixture
def plan(make_plan):
    return make_plan(slug="metered", tokens_per_hour=1500, max_tokens_per_request=1480)


@pytest.fixture
def staff(make_user) -> APIClient:
    client = APIClient()
    client.force_login(make_user(is_staff=True, username="operator"))
    return client


def scrape(client: APIClient, **headers: Any) -> Samples:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return parse(response.content.decode())


def test_decisions_settled_usage_and_latency_move_with_traffic(make_user, plan, staff):
    client = bearer_client(make_user(plan=plan))
    before = scrape(staff)
    used = 0
    for _ in range(2):
        response = client.post(URL, {**BODY, "max_tokens": 40}, format="json")
        assert response.status_code == 200
        used += response.json()["usage"]["total_tokens"]
    assert client.post(URL, {**BODY, "max_tokens": 1500}, format="json").status_code == 413
    assert client.post(URL, {**BODY, "max_tokens": 1420}, format="json").status_code == 429
    after = scrape(staff)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("quotas_decisions_total", outcome="allowed", limit="") == 2
    assert moved("quotas_decisions_total", outcome="too_large", limit="user:tokens:-") == 1
    assert moved("quotas_decisions_total", outcome="refused", limit="user:tokens:hour") == 1
    assert moved("quotas_reserve_seconds_count") == 4  # every decision, refusals too
    assert moved("quotas_reserve_seconds_sum") > 0
    assert moved("quotas_settled_tokens_total", model="gpt-4", plan="metered") == used
    assert value(after, "quotas_redis_up") == 1
    assert ("quotas_ledger_lag_seconds", ()) in after
    assert ("quotas_ledger_outboxes_waiting", ()) in after
    assert ("quotas_deferred_jobs", (("status", "queued"),)) in after


def test_an_outage_shows_as_an_open_breaker_and_degraded_requests(
    make_user, plan, staff, isolated_quotas, dead_redis_url
):
    client = bearer_client(make_user(plan=plan))
    before = scrape(staff)
    dead = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": dead_redis_url,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
    }
    quotas = quotas_settings(KEY_PREFIX=isolated_quotas, CACHE_ALIAS="dead")
    with override_settings(CACHES={**settings.CACHES, "dead": dead}, QUOTAS=quotas):
        for _ in range(4):  # three failures open the breaker
            response = client.post(URL, {**BODY, "max_tokens": 20}, format="json")
            assert response.status_code == 200
            assert response["X-Quota-Degraded"]
        during = scrape(staff)
    assert value(during, "quotas_breaker_state", breaker="redis") == 2
    assert (
        value(during, "quotas_decisions_total", outcome="degraded", limit="")
        - value(before, "quotas_decisions_total", outcome="degraded", limit="")
        == 4
    )
    services.reset_runtime()  # a breaker made anew starts closed, and says so
    services.get_breaker()
    assert value(scrape(staff), "quotas_breaker_state", breaker="redis") == 0
    assert value(during, "quotas_redis_up") == 0
    moved = value(during, "quotas_degraded_requests_total", rung="store_unavailable") - value(
        before, "quotas_degraded_requests_total", rung="store_unavailable"
    )
    assert moved == 4
    assert (
        value(during, "quotas_breaker_transitions_total", breaker="redis", state="open")
        - value(before, "quotas_breaker_transitions_total", breaker="redis", state="open")
        == 1
    )


def test_who_may_scrape(make_user, staff):
    anonymous = APIClient()
    assert anonymous.get("/metrics").status_code == 403
    member = APIClient()
    member.force_login(make_user(username="member"))
    assert member.get("/metrics").status_code == 403
    assert staff.get("/metrics").status_code == 200
    token = "s3cret-scraper-token-0123"
    with override_settings(QUOTAS=quotas_settings(METRICS_TOKEN=token)):
        missing = anonymous.get("/metrics")
        assert missing.status_code == 401
        assert missing["WWW-Authenticate"].startswith("Bearer")
        wrong = anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")
        assert wrong.status_code == 403
        assert anonymous.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    with override_settings(QUOTAS=quotas_settings(METRICS_ALLOWED_IPS=["10.0.0.0/8"])):
        assert anonymous.get("/metrics").status_code == 403  # the test client is 127.0.0.1
        assert anonymous.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200


def test_bad_metrics_settings_are_system_check_errors():
    from django.core.checks import run_checks

    bad = quotas_settings(METRICS_TOKEN="short", METRICS_ALLOWED_IPS=["10.0.0.0/8", "nope"])
    with override_settings(QUOTAS=bad):
        ids = [message.id for message in run_checks(tags=["quotas"])]
    assert ids.count("quotas.E011") == 2


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_processes_sharing_a_multiproc_dir_are_summed_in_one_scrape(tmp_path):
    record = """
        from quotas import telemetry
        telemetry.record_decision("allowed", "", 0.002)
        telemetry.record_settled("gpt-4", "free", 120, 3000)
    """
    for _ in range(3):
        _run(record, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    scraped = _run(
        """
        import django
        django.setup()
        from quotas.api.metrics import exposition
        print(exposition()[0].decode())
        """,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    samples = parse(scraped)
    assert value(samples, "quotas_decisions_total", outcome="allowed", limit="") == 3
    assert value(samples, "quotas_reserve_seconds_count") == 3
    assert value(samples, "quotas_settled_tokens_total", model="gpt-4", plan="free") == 360
    cost = value(samples, "quotas_settled_cost_dollars_total", model="gpt-4", plan="free")
    assert cost == pytest.approx(0.009)


def test_without_prometheus_client_metrics_are_no_ops_and_the_mounted_view_warns():
    out = _run(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        import django
        django.setup()
        from types import SimpleNamespace
        from django.core.checks import run_checks
        from django.test import RequestFactory
        from quotas import telemetry
        from quotas.api.metrics import MetricsView
        telemetry.record_decision("allowed", "", 0.001)
        telemetry.record_settled("gpt-4", "free", 10, 10)
        telemetry.record_degraded("cache")
        request = RequestFactory().get("/metrics")
        request.user = SimpleNamespace(is_active=True, is_staff=True)
        print(telemetry.AVAILABLE, MetricsView.as_view()(request).status_code)
        print(sorted(m.id for m in run_checks(tags=["quotas"]) if m.id == "quotas.W004"))
        """,
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    assert out.split("\n")[:2] == ["False 503", "['quotas.W004']"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_gunicorn_workers_are_summed_in_every_scrape(make_user, plan, isolated_quotas, tmp_path):
    from rest_framework.authtoken.models import Token

    from tests.gateway_server import running_gateway

    token = Token.objects.create(user=make_user(plan=plan)).key
    scraper = "scrape-token-0123456789"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_TOKEN": scraper}
    with running_gateway(isolated_quotas, workers=2, **env) as port:
        for _ in range(12):  # new connections: the workers share them
            _post(port, token)
        scrapes = [parse(_get(port, "/metrics", scraper)) for _ in range(4)]
    assert len({p.name for p in tmp_path.glob("counter_*.db")}) >= 2  # both workers counted
    for samples in scrapes:  # whichever worker answers, it sums every worker's files
        assert value(samples, "quotas_decisions_total", outcome="allowed", limit="") == 12
        assert value(samples, "quotas_settled_tokens_total", model="gpt-4", plan="metered") > 0


def _post(port: int, token: str) -> None:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({**BODY, "max_tokens": 10})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request("POST", URL, body, headers)
    assert conn.getresponse().status == 200
    conn.close()


def _get(port: int, path: str, token: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    assert response.status == 200
    text = response.read().decode()
    conn.close()
    return text
