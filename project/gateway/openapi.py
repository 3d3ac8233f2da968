"""The OpenAPI description of ``POST /v1/chat/completions`` (drf-spectacular): OpenAI's
``chat.completion`` object, and every error the endpoint answers in the quota app's shapes."""

from __future__ import annotations

from rest_framework import serializers

from quotas.api.schema import AUTH_ERRORS, QUOTA_ERRORS, DetailSerializer, QuotaErrorSerializer

__all__ = ["CHAT_RESPONSES", "ChatCompletionSerializer"]


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_null=True, allow_blank=True)
    refusal = serializers.CharField(allow_null=True, required=False)


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0)
    message = MessageSerializer()
    logprobs = serializers.JSONField(required=False)
    finish_reason = serializers.ChoiceField(
        choices=["stop", "length", "content_filter", "tool_calls", "function_call"],
        allow_null=True,
    )


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(min_value=0)
    completion_tokens = serializers.IntegerField(min_value=0)
    total_tokens = serializers.IntegerField(min_value=0)


class ChatCompletionSerializer(serializers.Serializer):
    """OpenAI's ``chat.completion`` (with ``"stream": true``: ``text/event-stream`` chunks,
    the last one carrying ``usage``)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion"])
    created = serializers.IntegerField()
    model = serializers.CharField()
    system_fingerprint = serializers.CharField(allow_null=True, required=False)
    choices = ChoiceSerializer(many=True)
    usage = UsageSerializer()


CHAT_RESPONSES = {
    200: ChatCompletionSerializer,
    **QUOTA_ERRORS,
    400: (QuotaErrorSerializer, "Invalid request: ``error.param`` names the field at fault."),
    **AUTH_ERRORS,
    403: (DetailSerializer, "No quota plan applies to the user."),
    411: (QuotaErrorSerializer, "A chunked body without Content-Length (length_required)."),
}
