"""Validation of OpenAI chat-completions requests.

Unknown fields are ignored (clients send many we do not use); a known field of the wrong type
is refused. DRF's stock fields coerce (``"5"`` to 5, ``"yes"`` to ``True``, ``5`` to ``"5"``),
which hides client bugs and would let a body past validation that the quota estimator then
reads differently, so the fields here accept only the JSON type OpenAI documents.

Validation costs linear time with a small constant and stops at the first error: the messages
are checked by hand (DRF's ``ListField(child=Serializer())`` costs about 70 µs a message and
reports an error for every one: 333,320 empty messages took 22 s to refuse), at most
``MAX_MESSAGES`` of them, with DRF's own error messages. The bounds are the quota app's
(``quotas.core.bounds``), so the gateway and the estimator refuse the same bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from quotas.core.bounds import MAX_MESSAGES, MAX_MODEL_LENGTH, MAX_TOKENS, check_model_name

__all__ = ["ChatCompletionRequestSerializer", "first_error"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
INT64 = 2**63


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


@extend_schema_field(
    {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
)
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


class ModelNameField(StrictCharField):
    """A model name the ledger can store: at most ``MAX_MODEL_LENGTH`` characters, no
    control characters (they could split a log line or a header)."""

    default_error_messages = {"control": "Must not contain control characters."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_length=MAX_MODEL_LENGTH, trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        model = super().to_internal_value(data)
        if len(model) <= MAX_MODEL_LENGTH:  # longer: DRF's max_length validator says so
            try:
                check_model_name(model)
            except ValueError:
                self.fail("control")
        return model


# DRF's messages, so a refusal reads the same as before validation was done by hand.
REQUIRED = "This field is required."
NOT_NULL = "This field may not be null."
NOT_AN_OBJECT = "Invalid data. Expected a dictionary, but got {kind}."


def message_error(message: Any) -> dict[str, list[str]] | list[str] | None:
    """The first error of one chat message (``role``, ``content``, optional ``name``) in DRF's
    error shape, or ``None`` when it is valid."""
    if not isinstance(message, Mapping):
        return [NOT_AN_OBJECT.format(kind=type(message).__name__)]
    role = message.get("role")
    if "role" not in message:
        return {"role": [REQUIRED]}
    if role is None:
        return {"role": [NOT_NULL]}
    if not isinstance(role, str) or role not in ROLES:
        return {"role": [f'"{_excerpt(role)}" is not a valid choice.']}
    if "content" not in message:
        return {"content": [REQUIRED]}
    content = message["content"]
    if content is not None and not _is_content(content):
        return {"content": [MessageContentField.default_error_messages["invalid"]]}
    if "name" in message and not isinstance(message["name"], str):
        return {"name": [NOT_NULL if message["name"] is None else "Not a valid string."]}
    return None


def _is_content(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(part, str | Mapping) for part in content)


def _excerpt(value: Any) -> str:
    text = str(value) if isinstance(value, str | int | float) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


@extend_schema_field(
    {"type": "array", "items": {"type": "object", "required": ["role"]}, "minItems": 1}
)
class MessagesField(serializers.Field):
    """``messages``: a non-empty list of at most ``MAX_MESSAGES`` chat messages, checked in
    one pass that stops at the first invalid message."""

    default_error_messages = {
        "not_a_list": 'Expected a list of items but got type "{input_type}".',
        "empty": "This list may not be empty.",
        "too_many": "Ensure this field has no more than {max_length} elements.",
    }

    def to_internal_value(self, data: Any) -> list[Any]:
        if not isinstance(data, list):
            self.fail("not_a_list", input_type=type(data).__name__)
        if not data:
            self.fail("empty")
        if len(data) > MAX_MESSAGES:
            self.fail("too_many", max_length=MAX_MESSAGES)
        for index, message in enumerate(data):
            error = message_error(message)
            if error is not None:
                raise serializers.ValidationError({index: error})
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = StrictBooleanField(required=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    """The fields of ``POST /v1/chat/completions`` this gateway reads or checks."""

    model = ModelNameField()
    messages = MessagesField()
    max_tokens = StrictIntegerField(
        min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True
    )
    max_completion_tokens = StrictIntegerField(
        min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True
    )
    stream = StrictBooleanField(required=False, allow_null=True)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    temperature = StrictFloatField(min_value=0, max_value=2, required=False, allow_null=True)
    top_p = StrictFloatField(min_value=0, max_value=1, required=False, allow_null=True)
    presence_penalty = StrictFloatField(min_value=-2, max_value=2, required=False, allow_null=True)
    frequency_penalty = StrictFloatField(min_value=-2, max_value=2, required=False, allow_null=True)
    # The fake model has one answer; several choices would also cost more than the estimate.
    n = StrictIntegerField(min_value=1, max_value=1, required=False, allow_null=True)
    seed = StrictIntegerField(
        min_value=-INT64, max_value=INT64 - 1, required=False, allow_null=True
    )
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
