"""The README's contracts agree with the code: settings, error bodies, budget fields."""

from __future__ import annotations

import re
from pathlib import Path

from quotas.api.serializers import BudgetSerializer
from quotas.conf import DEFAULTS
from quotas.exceptions import QuotaExceeded, RequestTooLarge
from quotas.http import error_body

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def documented_keys(sentence_start: str) -> set[str]:
    """The quoted names in the ``"error": {...}`` object of the paragraph starting so."""
    paragraph = README[README.index(sentence_start) :].split("\n\n")[0]
    error = paragraph[paragraph.index('"error": {') :].split("}")[0]
    return set(re.findall(r'"(\w+)"', error)) - {"error"}


def test_every_setting_is_in_the_settings_reference():
    table = README[README.index("## Settings reference") : README.index("Redis keys:")]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert documented == set(DEFAULTS)


def test_the_429_body_is_documented_as_sent():
    exc = QuotaExceeded(limit=10, remaining=0, requested=3, retry_after=1.5)
    assert documented_keys("A 429 body is") == set(error_body(exc)["error"])


def test_the_413_body_is_documented_as_sent():
    exc = RequestTooLarge(limit=10, requested=30, reason="the per-request cap")
    assert documented_keys("A 413 body is") == set(error_body(exc)["error"])


def test_the_budget_fields_are_documented_as_sent():
    start = README.index("`GET /quotas/me/` returns")
    text = README[start : README.index("`used` includes `reserved`", start)]
    assert set(re.findall(r'"(\w+)"', text)) - {"slug", "name"} == set(BudgetSerializer().fields)
