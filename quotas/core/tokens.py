"""Token counting: tiktoken encodings resolved offline (``quotas.core.encodings``) and the
chat-request counting rules (``quotas.core.chat``), under one name. Framework-free."""

from __future__ import annotations

from quotas.core.chat import count_chat_tokens
from quotas.core.encodings import (
    PIECE_CHARS,
    count_text_tokens,
    encoding_for_model,
    get_encoding,
)

__all__ = [
    "PIECE_CHARS",
    "count_chat_tokens",
    "count_text_tokens",
    "encoding_for_model",
    "get_encoding",
]
