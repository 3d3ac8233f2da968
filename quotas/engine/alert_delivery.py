"""Delivering one budget alert: a signed webhook POST, or an e-mail (Django's e-mail backend).

Called by the Celery tasks ``quotas.tasks.send_alert_webhook`` / ``send_alert_email``, which
retry a failure with exponential backoff. The rule is looked up by name at delivery time, so
the webhook secret never travels through the broker and a rule removed since is not sent.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from django.core.mail import send_mail

from quotas.conf import quota_settings
from quotas.core.alerts import SIGNATURE_HEADER, sign
from quotas.engine.alerts import rule_named

__all__ = ["DeliveryFailed", "alert_text", "deliver_email", "deliver_webhook"]


class DeliveryFailed(OSError):
    """The receiver did not take the alert (an error status, or no answer): retry later."""


def deliver_webhook(rule_name: str, payload: dict[str, Any]) -> int:
    """POST ``payload`` as JSON, signed, to the rule's webhook; the status it answered (0:
    no such rule or webhook any more). ``DeliveryFailed`` (an ``OSError``) when it failed."""
    rule = rule_named(rule_name)
    if rule is None or not rule.webhook_url:
        return 0
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    request = urllib.request.Request(
        rule.webhook_url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "django-llm-quotas (budget alert)",
            SIGNATURE_HEADER: sign(rule.webhook_secret, int(time.time()), body),
        },
    )
    timeout = float(quota_settings.ALERT_WEBHOOK_TIMEOUT_SECONDS)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except OSError as exc:  # URLError and HTTPError (an error status) are OSErrors
        raise DeliveryFailed(f"webhook {rule.webhook_url} failed: {exc}") from exc


def deliver_email(rule_name: str, payload: dict[str, Any]) -> int:
    """Mail the alert to the rule's addresses; how many messages were sent."""
    rule = rule_named(rule_name)
    if rule is None or not rule.emails:
        return 0
    subject, text = alert_text(payload)
    return send_mail(subject, text, None, list(rule.emails))


def alert_text(payload: dict[str, Any]) -> tuple[str, str]:
    """The subject and the body of an alert's e-mail."""
    who = payload["subject"]
    limit = payload["limit"]
    name = f"{who['type']} {who['id']}" + (f" (plan {who['plan']})" if who.get("plan") else "")
    share = f"{payload['threshold']:.0%}"
    subject = f"[quotas] {name} reached {share} of {limit['name']}"
    lines = [
        f"{name} has used {payload['used']} of {limit['budget']} {limit['metric']} "
        f"({payload['percent']}%) in the {limit['window']} window of {limit['name']}.",
        "A request was refused: the budget ran out." if payload["refused"] else "",
        f"The whole budget is back in {payload['reset_seconds']:.0f} s.",
        f"Rule: {payload['rule']}. Alert id: {payload['id']}.",
    ]
    return subject, "\n".join(line for line in lines if line) + "\n"
