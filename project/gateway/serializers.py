"""Validation of OpenAI chat-completions requests.

Unknown fields are ignored (clients send many we do not use); a known field of the wrong type
is refused. DRF's stock fields coerce (``"5"`` to 5, ``"yes"`` to ``True``, ``5`` to ``"5"``),
which hides client bugs and would let a body past validation that the quota estimator then
reads differently, so the fields here accept only the JSON type OpenAI documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers

__all__ = ["ChatCompletionRequestSerializer", "first_error"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class StrictCharField(serializers.CharField):
    """A JSON string; numbers are not turned into strings."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: not a boolean, a float or a numeric string."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number: not a boolean or a numeric string."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """``true`` or ``false``; not ``"yes"``, ``1`` or ``"true"``."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class MessageContentField(serializers.Field):
    """A message's ``content``: a string, or a list of content parts (objects or strings)."""

    default_error_messages = {"invalid": "Must be a string or a list of content parts."}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            return data
        if isinstance(data, list) and all(isinstance(part, str | Mapping) for part in data):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class StopField(serializers.Field):
    """``stop``: a string or a list of at most four strings."""

    default_error_messages = {"invalid": "Must be a string or a list of up to 4 strings."}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            return data
        if isinstance(data, list) and len(data) <= 4 and all(isinstance(s, str) for s in data):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


class MessageSerializer(serializers.Serializer):
    """One chat message: ``role``, ``content`` and an optional ``name``."""

    role = serializers.ChoiceField(choices=ROLES)
    content = MessageContentField(allow_null=True)
    name = StrictCharField(required=False)


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = StrictBooleanField(required=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    """The fields of ``POST /v1/chat/completions`` this gateway reads or checks."""

    model = StrictCharField()
    messages = serializers.ListField(child=MessageSerializer(), allow_empty=False)
    max_tokens = StrictIntegerField(min_value=1, required=False, allow_null=True)
    max_completion_tokens = StrictIntegerField(min_value=1, required=False, allow_null=True)
    stream = StrictBooleanField(required=False, allow_null=True)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    temperature = StrictFloatField(min_value=0, max_value=2, required=False, allow_null=True)
    top_p = StrictFloatField(min_value=0, max_value=1, required=False, allow_null=True)
    presence_penalty = StrictFloatField(min_value=-2, max_value=2, required=False, allow_null=True)
    frequency_penalty = StrictFloatField(min_value=-2, max_value=2, required=False, allow_null=True)
    # The fake model has one answer; several choices would also cost more than the estimate.
    n = StrictIntegerField(min_value=1, max_value=1, required=False, allow_null=True)
    seed = StrictIntegerField(required=False, allow_null=True)
    stop = StopField(required=False, allow_null=True)
    user = StrictCharField(required=False, allow_blank=True)


def first_error(detail: Any, path: str = "") -> tuple[str, str]:
    """The first error of a DRF ``ValidationError.detail`` as ``(param, message)``, where
    ``param`` names the field like OpenAI does: ``messages[0].role``."""
    if isinstance(detail, Mapping):
        key, value = next(iter(detail.items()))
        if key == "non_field_errors":
            return first_error(value, path)
        if isinstance(key, int):
            return first_error(value, f"{path}[{key}]")
        return first_error(value, f"{path}.{key}" if path else str(key))
    if isinstance(detail, list) and detail:
        return first_error(detail[0], path)
    return path, str(detail)
