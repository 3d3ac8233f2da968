"""Budget alert rules (``QUOTAS["ALERTS"]``) and webhook signatures. Framework-free.

A rule::

    {
        "name": "pro-budget",                # unique; default "rule-<index>"
        "plans": ["pro"],                    # users on these plans (their own limits)
        "teams": ["acme"],                   # these teams (their pooled limits)
        "thresholds": [0.8, 1.0],            # shares of a limit's budget
        "webhook_url": "https://ops.example.com/hooks/quotas",
        "webhook_secret": "a long random string",
        "emails": ["ops@example.com"],
    }

With neither ``plans`` nor ``teams`` a rule covers every user's and team's limits (never the
global ones). A rule needs a webhook, emails, or both.

Webhook bodies are signed as Stripe signs its events: the header
``X-Quotas-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the
secret>``; a receiver recomputes it and refuses old timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["SIGNATURE_HEADER", "AlertRule", "parse_rules", "sign", "verify"]

SIGNATURE_HEADER = "X-Quotas-Signature"
RULE_KEYS = frozenset(
    ("name", "plans", "teams", "thresholds", "webhook_url", "webhook_secret", "emails")
)


@dataclass(frozen=True)
class AlertRule:
    """One validated rule (see the module's docstring)."""

    name: str
    thresholds: tuple[float, ...]
    plans: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()
    webhook_url: str = ""
    webhook_secret: str = ""
    emails: tuple[str, ...] = ()

    def covers_user(self, plan: str) -> bool:
        """Whether the rule watches the own limits of a user on ``plan``."""
        return (not self.plans and not self.teams) or plan in self.plans

    def covers_team(self, team: str) -> bool:
        """Whether the rule watches the pooled limits of team ``team``."""
        return (not self.plans and not self.teams) or team in self.teams


def parse_rules(raw: Any) -> tuple[AlertRule, ...]:
    """The rules of ``QUOTAS["ALERTS"]``; ``ValueError`` saying what is wrong otherwise."""
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, list | tuple):
        raise ValueError("ALERTS must be a list of rules (dicts).")
    rules = tuple(_rule(index, item) for index, item in enumerate(raw))
    names = [rule.name for rule in rules]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"ALERTS rule names must be unique: {', '.join(duplicates)}.")
    return rules


def _rule(index: int, item: Any) -> AlertRule:
    where = f"ALERTS[{index}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be a dict.")
    unknown = sorted(set(item) - RULE_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(map(str, unknown))}.")
    name = item.get("name", f"rule-{index}")
    if not isinstance(name, str) or not name or len(name) > 100:
        raise ValueError(f"{where}['name'] must be a non-empty string of 100 characters at most.")
    url, secret = item.get("webhook_url") or "", item.get("webhook_secret") or ""
    _check_webhook(where, url, secret)
    emails = _strings(where, item, "emails")
    if any("@" not in email for email in emails):
        raise ValueError(f"{where}['emails'] must be e-mail addresses.")
    if not url and not emails:
        raise ValueError(f"{where} needs a webhook_url, emails, or both.")
    return AlertRule(
        name=name,
        thresholds=_thresholds(where, item.get("thresholds")),
        plans=frozenset(_strings(where, item, "plans")),
        teams=frozenset(_strings(where, item, "teams")),
        webhook_url=url,
        webhook_secret=secret,
        emails=emails,
    )


def _thresholds(where: str, raw: Any) -> tuple[float, ...]:
    if not isinstance(raw, list | tuple) or not raw or not all(map(_share, raw)):
        raise ValueError(
            f"{where}['thresholds'] must be a list of shares in (0, 1], e.g. [0.8, 1]."
        )
    return tuple(sorted({float(t) for t in raw}))


def _share(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def _strings(where: str, item: Mapping[str, Any], key: str) -> tuple[str, ...]:
    raw = item.get(key) or ()
    if isinstance(raw, str) or not isinstance(raw, list | tuple):
        raise ValueError(f"{where}[{key!r}] must be a list of strings.")
    if not all(isinstance(value, str) and value for value in raw):
        raise ValueError(f"{where}[{key!r}] must be a list of non-empty strings.")
    return tuple(raw)


def _check_webhook(where: str, url: Any, secret: Any) -> None:
    if not url:
        return
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{where}['webhook_url'] must be an http(s) URL.")
    if not isinstance(secret, str) or len(secret) < 16:
        raise ValueError(f"{where}['webhook_secret'] must be a string of 16 characters or more.")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Quotas-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds of
    ``now`` (what a receiver does)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)
