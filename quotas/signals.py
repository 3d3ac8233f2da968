"""Signals, named as past-tense events.

- ``quota_exceeded(user, scope, exception)``: a request was refused (429 or 413).
- ``usage_settled(user, scope, reservation_id, estimated_tokens, actual_tokens)``.
- ``reservation_expired(scope, reservation_id, estimated_tokens)``: never settled; charged at
  its estimate.
- ``budget_threshold_crossed(user, scope, used, limit, threshold)``: a reservation took the user
  from below to at-or-above ``QUOTAS["ALERT_THRESHOLD"]`` of their budget.
"""

from django.dispatch import Signal

__all__ = ["budget_threshold_crossed", "quota_exceeded", "reservation_expired", "usage_settled"]

quota_exceeded = Signal()
usage_settled = Signal()
reservation_expired = Signal()
budget_threshold_crossed = Signal()
