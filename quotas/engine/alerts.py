"""Budget alerts: after a decision, which ``QUOTAS["ALERTS"]`` thresholds a user's or a
team's usage has reached, each announced once per window.

A threshold ``t`` of a limit is reached when the window holds ``t`` x its budget or more
after an allowed reservation (so usage settled above its estimate is caught by the next
request), and a refusal by a limit reaches its thresholds of 1 (100 %: the budget ran out
for a request). Each (rule, threshold, limit, user or team) is announced once per window:
the first process to see it claims a Redis key (``SET NX``) that lives as long as the window
(a sliding window's length; a calendar period until it ends), then queues one webhook task
and one e-mail task (``quotas.tasks``), which retry with backoff. Nothing here can fail or
slow down a request beyond that one claim: errors are logged, and a process remembers what
it claimed, so a user above a threshold costs no Redis call per request.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from quotas.conf import quota_settings
from quotas.core.alerts import AlertRule, parse_rules
from quotas.core.limits import Period, Scope
from quotas.core.types import PolicyState
from quotas.engine import dispatch
from quotas.engine.runtime import broker_breaker, get_store, per_process

__all__ = ["Crossing", "alert_rules", "check_alerts", "rule_named"]

logger = logging.getLogger("quotas")
# Claims this process remembers (key -> monotonic expiry); cleared when it grows past this.
MEMORY = 10_000


@dataclass(frozen=True)
class Crossing:
    """One threshold of one limit reached by one user or team."""

    rule: AlertRule
    threshold: float
    policy: PolicyState
    kind: str  # "user" or "team"
    subject: str  # the user's quota key, or the team's id
    plan: str
    team: str
    refused: bool
    ttl: int


def alert_rules() -> tuple[AlertRule, ...]:
    """The rules, parsed once per process and settings change (invalid rules: none; the
    system check ``quotas.E010`` says why)."""
    return per_process("alert_rules", _parsed_rules)


def _parsed_rules() -> tuple[AlertRule, ...]:
    try:
        return parse_rules(quota_settings.ALERTS or [])
    except ValueError as exc:
        logger.error("quotas: QUOTAS['ALERTS'] is invalid, no alert is sent: %s", exc)
        return ()


def rule_named(name: str) -> AlertRule | None:
    """The rule called ``name`` now (``None``: removed since the alert was queued)."""
    return next((rule for rule in alert_rules() if rule.name == name), None)


def check_alerts(
    scope: str, plan: str, team: Any, ask: Any, policies: tuple[PolicyState, ...], refused: int
) -> None:
    """Announce the thresholds this decision reached (``refused``: the 1-based index of the
    refusing limit, 0 when allowed). Never raises."""
    rules = alert_rules()
    if not rules:
        return
    try:
        for crossing in _crossings(rules, scope, plan, team, ask, policies, refused):
            _announce(crossing)
    except Exception:  # an alert must never cost a request anything
        logger.exception("quotas: budget alert check failed")


def _crossings(
    rules: tuple[AlertRule, ...],
    scope: str,
    plan: str,
    team: Any,
    ask: Any,
    policies: tuple[PolicyState, ...],
    refused: int,
) -> list[Crossing]:
    found = []
    for index, (counter, policy) in enumerate(zip(ask.charges.counters, policies, strict=True)):
        limit = counter.limit
        if limit.scope is Scope.GLOBAL or policy.limit <= 0:
            continue
        is_team = limit.scope is Scope.TEAM and team is not None
        hit = index + 1 == refused
        used = policy.limit - policy.remaining
        ttl = _ttl(limit.window.period, policy)
        for rule in rules:
            if not (rule.covers_team(team.slug) if is_team else rule.covers_user(plan)):
                continue
            for threshold in rule.thresholds:
                if used >= threshold * policy.limit or (hit and threshold >= 1):
                    subject = str(team.id) if is_team else scope
                    kind = "team" if is_team else "user"
                    team_slug = team.slug if team is not None else ""
                    found.append(
                        Crossing(rule, threshold, policy, kind, subject, plan, team_slug, hit, ttl)
                    )
    return found


def _ttl(period: Period, policy: PolicyState) -> int:
    """How long one announcement stands: the sliding window's length, or until the calendar
    period ends."""
    seconds = policy.reset_seconds if period is not Period.SLIDING else policy.window_seconds
    return max(int(seconds + 0.999), 1)


_claimed: dict[str, float] = {}


def _announce(crossing: Crossing) -> None:
    key = _key(crossing)
    now = time.monotonic()
    if _claimed.get(key, 0.0) > now:
        return
    if len(_claimed) > MEMORY:
        _claimed.clear()
    _claimed[key] = now + crossing.ttl
    client = get_store().client
    try:
        if not client.set(key, "1", nx=True, ex=crossing.ttl):
            return  # another process (or this one, before a restart) announced it
    except RedisError:
        _claimed.pop(key, None)
        return
    if not _queue(crossing):
        client.delete(key)  # not sent: the next request that sees it tries again
        _claimed.pop(key, None)


def _key(crossing: Crossing) -> str:
    tag = f"t:{crossing.subject}" if crossing.kind == "team" else crossing.subject
    parts = (crossing.rule.name, crossing.policy.name, f"{crossing.threshold:g}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return f"{get_store().prefix}:{{{tag}}}:alert:{digest}"


def _queue(crossing: Crossing) -> bool:
    """Queue the webhook and the e-mail; whether the broker took them."""
    breaker = broker_breaker()
    if not breaker.allow():
        return False
    payload = alert_payload(crossing)
    try:
        if crossing.rule.webhook_url:
            dispatch.send(dispatch.ALERT_WEBHOOK, crossing.rule.name, payload)
        if crossing.rule.emails:
            dispatch.send(dispatch.ALERT_EMAIL, crossing.rule.name, payload)
    except Exception:
        breaker.record_failure()
        logger.warning("quotas: could not queue budget alert %s", payload["id"], exc_info=True)
        return False
    breaker.record_success()
    return True


def alert_payload(crossing: Crossing) -> dict[str, Any]:
    """The JSON an alert sends (the webhook's body; the e-mail's text is made from it)."""
    policy = crossing.policy
    used = policy.limit - policy.remaining
    return {
        "event": "budget_threshold_crossed",
        "id": secrets.token_hex(16),  # the same on every retry of this alert
        "rule": crossing.rule.name,
        "threshold": crossing.threshold,
        "subject": {
            "type": crossing.kind,
            "id": crossing.subject,
            "plan": crossing.plan or None,
            "team": crossing.team or None,
        },
        "limit": {
            "name": policy.name,
            "scope": policy.scope,
            "metric": policy.metric,
            "model": policy.model,
            "window": policy.window,
            "budget": policy.limit,
        },
        "used": used,
        "percent": round(100 * used / policy.limit, 1),
        "refused": crossing.refused,
        "reset_seconds": policy.reset_seconds,
        "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
