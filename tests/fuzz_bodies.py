"""Hypothesis strategies for request bodies of ``POST /v1/chat/completions``: mostly shaped
like chat requests (so they get past the first check and reach the estimator, the fake model
and the ledger), with every field sometimes the wrong JSON type, out of range, huge, nested
or missing; and some bodies that are not chat requests at all (any JSON, broken JSON, bytes).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

__all__ = ["raw_bodies"]

ROLES = ["system", "developer", "user", "assistant", "tool", "function", "wizard", ""]
MODELS = ["gpt-4", "gpt-4o", "gpt-3.5-turbo", "", "my-model", "x" * 201, "a\r\nb", "\x00"]
BIG_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, 10**9, 10**9 + 1, -(2**63) - 1]

# Any JSON value, a few levels deep.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(BIG_INTS)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
texts = st.text(max_size=200) | st.sampled_from(["hello world", " hello" * 500, "a" * 5000])
numbers = st.sampled_from(BIG_INTS) | st.integers(-5, 5000) | json_values


def maybe(strategy: Any) -> Any:
    """Usually ``strategy``, sometimes any JSON value instead (the wrong type)."""
    return st.one_of(strategy, strategy, strategy, json_values)


image_urls = st.sampled_from(
    [
        "https://example.com/cat.png",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
        "data:image/png;base64,!!!not base64",
        "data:,",
        "",
    ]
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": maybe(texts)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": maybe(
                st.fixed_dictionaries(
                    {"url": maybe(image_urls)},
                    optional={"detail": maybe(st.sampled_from(["auto", "low", "high", "x"]))},
                )
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["input_audio", "file", "refusal", "other"])},
        optional={"refusal": texts, "content": json_values},
    ),
    texts,
    json_values,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": maybe(st.text(max_size=10)),
            "type": st.just("function"),
            "function": maybe(
                st.fixed_dictionaries({"name": maybe(texts), "arguments": maybe(texts)})
            ),
        }
    ),
    max_size=3,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "role": maybe(st.sampled_from(ROLES)),
        "content": maybe(st.none() | texts | st.lists(parts, max_size=6)),
        "name": maybe(st.text(max_size=20)),
        "tool_calls": maybe(tool_calls),
        "tool_call_id": maybe(st.text(max_size=10)),
        "extra": json_values,
    },
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": maybe(st.text(max_size=20))},
                optional={"description": maybe(texts), "parameters": json_values},
            ),
        }
    ),
    max_size=3,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": maybe(st.sampled_from(MODELS) | st.text(max_size=30)),
        "messages": maybe(st.lists(maybe(messages), max_size=6)),
        "max_tokens": maybe(numbers),
        "max_completion_tokens": maybe(numbers),
        "stream": maybe(st.booleans()),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
        "temperature": maybe(st.floats(-1, 3, allow_nan=False)),
        "n": maybe(st.integers(-1, 3)),
        "seed": maybe(numbers),
        "stop": maybe(st.lists(st.text(max_size=5), max_size=6)),
        "tools": maybe(tools),
        "tool_choice": json_values,
        "response_format": json_values,
        "user": maybe(st.text(max_size=20)),
        "extra": json_values,
    },
)


# Bodies the gateway serves (so usage, streams and the ledger are exercised too).
valid_chat_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt-4", "gpt-3.5-turbo", "my-model"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user", "assistant"]),
                    "content": texts | st.lists(st.text(max_size=30) | parts, max_size=3),
                },
                optional={"name": st.text(max_size=10)},
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional={
        "max_tokens": st.integers(1, 400),
        "stream": st.booleans(),
        "tools": tools,
        "temperature": st.floats(0, 2),
    },
)


def _nested(depth: int) -> bytes:
    return b'{"model":"gpt-4","messages":' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    valid_chat_bodies.map(lambda body: json.dumps(body).encode()),
    valid_chat_bodies.map(lambda body: json.dumps(body).encode()),
    chat_bodies.map(lambda body: json.dumps(body).encode()),
    chat_bodies.map(lambda body: json.dumps(body).encode()),
    chat_bodies.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.integers(1, 20_000).map(_nested),
    chat_bodies.map(lambda body: json.dumps(body).encode()[:-1]),  # cut short
)
