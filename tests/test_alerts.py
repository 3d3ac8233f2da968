"""Budget alerts (``QUOTAS["ALERTS"]``): a webhook receiver on a loopback port gets exactly
one signed alert per crossing per window (real Redis for the deduplication, Celery tasks run
eagerly), e-mails through Django's locmem backend, retries after a failed delivery, and a
dead receiver that costs requests nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core import mail
from django.core.checks import run_checks
from kombu import Connection

from quotas import services
from quotas.core.alerts import SIGNATURE_HEADER, parse_rules, verify
from quotas.engine import alerts as alert_engine
from quotas.exceptions import QuotaExceeded
from quotas.models import Team, UserQuota
from quotas.signals import budget_threshold_crossed
from quotas.tasks import send_alert_webhook_task
from tests.support import refusing_port
from tests.test_gateway import BODY, URL, bearer_client
from tests.test_tasks_worker import _workers, broker  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db

SECRET = "whsec-0123456789abcdef"


class Receiver:
    """A webhook receiver on 127.0.0.1: keeps every POST; answers 500 to the first
    ``failures`` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.posts: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((dict(self.headers), body))
                failing = len(receiver.posts) <= receiver.failures
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/quotas"

    def accepted(self) -> list[dict[str, Any]]:
        """The alerts accepted (2xx), each checked for a valid signature."""
        taken = self.posts[self.failures :]
        for headers, body in taken:
            assert verify(SECRET, headers[SIGNATURE_HEADER], body, time.time())
            assert headers["Content-Type"] == "application/json"
        return [json.loads(body) for _, body in taken]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    thread = threading.Thread(target=made.server.serve_forever, daemon=True)
    thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


@pytest.fixture
def alerting(quota_config: Any, receiver: Receiver) -> Any:
    def apply(**rule: Any) -> None:
        alert_engine._claimed.clear()
        base = {
            "name": "budget",
            "thresholds": [0.5, 1.0],
            "webhook_url": receiver.url,
            "webhook_secret": SECRET,
            "emails": ["ops@example.com"],
        }
        quota_config(ALERTS=[{**base, **rule}])

    return apply


@pytest.fixture
def plan(make_plan):
    return make_plan(slug="alerted", tokens_per_hour=1000)


def test_one_signed_alert_per_crossing_per_window(make_user, plan, alerting, receiver):
    alerting(plans=["alerted"])
    user = make_user(plan=plan)
    services.reserve(user, 300)  # 30 %
    assert receiver.posts == []
    services.reserve(user, 300)  # 60 %: 50 % crossed
    services.reserve(user, 100)  # 70 %: already announced
    alert_engine._claimed.clear()  # as another process, which only Redis tells
    services.reserve(user, 100)  # 80 %
    [half] = receiver.accepted()
    assert half["threshold"] == 0.5
    assert half["subject"] == {"type": "user", "id": str(user.pk), "plan": "alerted", "team": None}
    assert half["limit"]["name"] == "tokens-hour"
    assert (half["limit"]["budget"], half["used"], half["percent"]) == (1000, 600, 60.0)
    assert half["refused"] is False
    for _ in range(2):
        with pytest.raises(QuotaExceeded):
            services.reserve(user, 400)  # the budget ran out for it: 100 % announced once
    half_again, full = receiver.accepted()
    assert half_again == half
    assert (full["threshold"], full["refused"], full["used"]) == (1.0, True, 800)
    assert [m.subject for m in mail.outbox] == [
        f"[quotas] user {user.pk} (plan alerted) reached 50% of tokens-hour",
        f"[quotas] user {user.pk} (plan alerted) reached 100% of tokens-hour",
    ]
    assert mail.outbox[0].to == ["ops@example.com"]
    assert "600 of 1000 tokens" in mail.outbox[0].body


def test_a_rule_watches_only_its_plans(make_user, plan, make_plan, alerting, receiver):
    alerting(plans=["another"])
    services.reserve(make_user(plan=plan), 900)
    assert receiver.posts == []
    assert mail.outbox == []


def test_a_team_is_announced_once_whichever_member_crosses(
    make_user, make_plan, alerting, receiver
):
    alerting(teams=["acme"], thresholds=[0.8], emails=[])
    team = Team.objects.create(slug="acme", name="Acme", plan=make_plan(tokens_per_hour=1000))
    roomy = make_plan(slug="roomy", tokens_per_hour=10**9)
    members = []
    for _ in range(2):
        user = make_user()
        UserQuota.objects.create(user=user, plan=roomy, team=team)
        members.append(user)
    services.reserve(members[0], 500)
    services.reserve(members[1], 400)  # the team at 90 %
    services.reserve(members[0], 50)
    [alert] = receiver.accepted()
    assert alert["subject"] == {"type": "team", "id": str(team.pk), "plan": "roomy", "team": "acme"}
    assert (alert["limit"]["name"], alert["used"]) == ("team-tokens-hour", 900)
    assert mail.outbox == []


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_failed_delivery_is_retried_by_a_real_worker_and_accepted_once(receiver, request):
    queue = request.getfixturevalue("broker")  # a private queue (tests.test_tasks_worker)
    receiver.failures = 2
    rule = {"name": "ops", "thresholds": [0.8], "webhook_url": receiver.url}
    rule["webhook_secret"] = SECRET
    start = next(_workers(queue, {"QUOTAS_ALERTS": json.dumps([rule])}))
    payload = {"id": "alert-1", "event": "budget_threshold_crossed", "threshold": 0.8}
    worker = start()
    try:
        with (
            Connection(queue["url"], transport_options=queue["options"]) as conn,
            conn.Producer() as producer,
        ):
            send_alert_webhook_task.apply_async(
                args=["ops", payload], queue=queue["queue"], producer=producer
            )
        deadline = time.monotonic() + 30
        while len(receiver.posts) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # nothing more arrives once one was accepted
    finally:
        worker.terminate()
        worker.wait(10)
    assert len(receiver.posts) == 3  # two 500s, each retried with backoff, then a 204
    assert receiver.accepted() == [payload]
    assert [json.loads(body) for _, body in receiver.posts] == [payload] * 3


def test_a_dead_receiver_costs_requests_nothing(make_user, plan, quota_config):
    with refusing_port() as port:
        quota_config(
            ALERTS=[
                {
                    "thresholds": [0.1],
                    "webhook_url": f"http://127.0.0.1:{port}/",
                    "webhook_secret": SECRET,
                }
            ]
        )
        client = bearer_client(make_user(plan=plan))
        for _ in range(2):
            response = client.post(URL, {**BODY, "max_tokens": 100}, format="json")
            assert response.status_code == 200


def test_the_signal_still_fires(make_user, plan, alerting):
    alerting(plans=["alerted"])
    seen: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(kwargs)

    budget_threshold_crossed.connect(receiver)
    try:
        services.reserve(make_user(plan=plan), 850)
    finally:
        budget_threshold_crossed.disconnect(receiver)
    assert [(s["used"], s["limit"]) for s in seen] == [(850, 1000)]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"thresholds": [0.8]}, "needs a webhook_url, emails, or both"),
        ({"thresholds": [], "emails": ["a@b.c"]}, "thresholds"),
        ({"thresholds": [1.5], "emails": ["a@b.c"]}, "thresholds"),
        ({"thresholds": [0.8], "webhook_url": "ftp://x/", "webhook_secret": SECRET}, "http(s)"),
        ({"thresholds": [0.8], "webhook_url": "https://x/", "webhook_secret": "short"}, "16"),
        ({"thresholds": [0.8], "emails": "ops@example.com"}, "list of strings"),
        ({"thresholds": [0.8], "emails": ["a@b.c"], "plan": ["pro"]}, "unknown keys: plan"),
    ],
)
def test_bad_rules_are_system_check_errors(quota_config, rules, message):
    quota_config(ALERTS=[rules])
    errors = [m for m in run_checks(tags=["quotas"]) if m.id == "quotas.E012"]
    assert len(errors) == 1
    assert message in errors[0].msg
    with pytest.raises(ValueError, match="unique"):
        parse_rules([{"name": "a", "emails": ["x@y.z"], "thresholds": [1]}] * 2)
