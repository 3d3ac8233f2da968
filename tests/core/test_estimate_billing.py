"""The estimate sees everything a provider bills (tools, tool calls, parts, images), refuses
what it cannot estimate, holds every body to the bounds, and costs linear time."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import struct
import time
import zlib

import pytest

from quotas.core import bounds
from quotas.core.chat import count_prompt_tokens
from quotas.core.estimate import InvalidRequest, estimate_request
from quotas.core.images import image_size, image_tokens
from quotas.core.tokens import PIECE_CHARS, count_text_tokens, get_encoding

CL100K = get_encoding("cl100k_base")
# 40,002 tokens of text, the figure the issue hid in each place below.
HIDDEN = " hello" * 40_002
HIDDEN_TOKENS = 40_002


def chat(*messages, **fields):
    return {"model": "gpt-4", "messages": list(messages), **fields}


def user(content, **fields):
    return {"role": "user", "content": content, **fields}


@pytest.mark.parametrize(
    "body",
    [
        chat(
            user("Hi"),
            tools=[{"type": "function", "function": {"name": "f", "description": HIDDEN}}],
        ),
        chat(
            user("Hi"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": HIDDEN}}
                ],
            },
        ),
        chat(user([{"type": "text", "content": HIDDEN}])),
        chat(user("Hi", extra=[HIDDEN])),
        chat(user([{"type": "text", "text": {"value": HIDDEN}}])),
        chat(user("Hi"), functions=[{"name": "f", "parameters": {"description": HIDDEN}}]),
        chat(
            user("Hi"),
            response_format={"type": "json_schema", "json_schema": {"schema": {"x": HIDDEN}}},
        ),
        chat(user("Hi"), tool_choice={"type": "function", "function": {"name": HIDDEN}}),
        chat(user("Hi"), prediction={"type": "content", "content": HIDDEN}),
        chat(user([{"type": "refusal", "refusal": HIDDEN}])),
        chat({"role": "tool", "tool_call_id": "c1", "content": HIDDEN}),
        chat(user([{"type": "image_url", "image_url": {"url": "http://x/y.png", "alt": HIDDEN}}])),
        chat(user("Hi", name={"first": HIDDEN})),
    ],
    ids=[
        "tool-description",
        "tool-call-arguments",
        "text-part-with-content-key",
        "list-valued-extra-key",
        "object-valued-text",
        "legacy-functions",
        "response-format-schema",
        "tool-choice",
        "prediction",
        "refusal-part",
        "tool-result",
        "image-extra-key",
        "object-valued-name",
    ],
)
def test_tokens_hidden_anywhere_the_provider_reads_are_charged(body):
    # Before: each of these was charged 57-69 tokens up front.
    assert estimate_request(body).prompt_tokens >= HIDDEN_TOKENS


def png(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG's signature and header chunk (enough for its size), then ``payload``."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    crc = struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + crc + payload


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def image_part(url: str, detail: str | None = None):
    image = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image}


def test_a_220_kb_data_url_is_charged_by_the_tile_rule_not_as_58_tokens():
    url = data_url(png(1024, 1024, random.Random(1).randbytes(165_000)))
    assert len(url) > 220_000
    question = {"type": "text", "text": "What is this?"}
    text_only = estimate_request(chat(user([question])))
    with_image = estimate_request(chat(user([question, image_part(url)])))
    # OpenAI's worked example: a 1024 x 1024 image at high detail is 765 tokens.
    assert with_image.prompt_tokens - text_only.prompt_tokens == 765
    low = estimate_request(chat(user([question, image_part(url, "low")])))
    assert low.prompt_tokens - text_only.prompt_tokens == 85


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((1024, 1024), 765),
        ((2048, 4096), 1105),
        ((768, 2048), 1445),
        ((100, 100), 255),
        ((4000, 10), 765),
    ],
)
def test_openais_tile_rule(size, tokens):
    assert image_tokens("high", size) == tokens
    assert image_tokens("auto", size) == tokens
    assert image_tokens("low", size) == 85


def test_an_image_of_unknown_size_costs_the_most_a_high_detail_image_can():
    assert image_tokens("high", None) == 1445
    body = chat(user([image_part("https://example.com/cat.jpg")]))
    assert estimate_request(body).prompt_tokens == 3 + 3 + 1 + 1445


def test_image_sizes_are_read_from_gif_jpeg_and_webp_headers():
    gif = b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 20
    assert image_size(data_url(gif, "gif")) == (640, 480)
    # A JPEG with an APP0 segment before its frame header.
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 300, 500) + b"\x00" * 10
    assert image_size(data_url(b"\xff\xd8" + app0 + sof, "jpeg")) == (500, 300)
    vp8x = b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 8 + (799).to_bytes(3, "little")
    vp8x += (599).to_bytes(3, "little")
    assert image_size(data_url(vp8x, "webp")) == (800, 600)
    assert image_size("data:image/png;base64,not-an-image") is None
    assert image_size("https://example.com/a.png") is None


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], ".type"),
        ([{"type": "file", "file": {"file_id": "file-1"}}], ".type"),
        ([image_part("http://x/y.png", "ultra")], ".image_url.detail"),
        ([{"type": "image_url", "image_url": {}}], ".image_url.url"),
        ([42], ""),
    ],
)
def test_parts_that_cannot_be_estimated_are_refused_naming_them(content, param):
    with pytest.raises(InvalidRequest) as caught:
        estimate_request(chat(user(content)))
    assert caught.value.param == f"messages[0].content[0]{param}"
    assert caught.value.code == "invalid_request"


def test_refusals_name_the_field_as_openai_does():
    with pytest.raises(InvalidRequest) as caught:
        estimate_request(chat(user("Hi"), {"role": "user", "content": 5}))
    assert caught.value.param == "messages[1].content"


def test_long_ordinary_text_counts_exactly_and_long_runs_never_count_fewer():
    text = " ".join(f"word{i} and more, text." for i in range(20_000))
    assert len(text) > 10 * PIECE_CHARS
    assert count_text_tokens(CL100K, text) == len(CL100K.encode_ordinary(text))
    run = "".join(random.Random(2).choice("abcdefghij") for _ in range(50_000))
    assert count_text_tokens(CL100K, run) >= len(CL100K.encode_ordinary(run))


# -- bounds ------------------------------------------------------------------------------------
def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_deeper_than_the_bound_is_refused():
    ok = chat(user("Hi"), tools=nested(bounds.MAX_JSON_DEPTH - 1))
    estimate_request(ok)
    with pytest.raises(InvalidRequest, match="more than 64 levels"):
        estimate_request(chat(user("Hi"), tools=nested(bounds.MAX_JSON_DEPTH)))
    with pytest.raises(InvalidRequest, match="levels"):
        estimate_request(chat(user("Hi"), extra=nested(900)))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [2**63, 2**64, bounds.MAX_TOKENS + 1])
def test_token_figures_above_the_bound_are_refused(field, value):
    with pytest.raises(InvalidRequest, match=f"at most {bounds.MAX_TOKENS}") as caught:
        estimate_request(chat(user("Hi"), **{field: value}))
    assert caught.value.param == field


def test_the_bound_itself_is_accepted():
    assert estimate_request(chat(user("Hi"), max_tokens=bounds.MAX_TOKENS)).output_tokens == (
        bounds.MAX_TOKENS
    )


@pytest.mark.parametrize(
    ("model", "words"),
    [("x" * 201, "at most 200 characters"), ("gpt-4\r\nX: y", "control"), ("gpt\x00", "control")],
)
def test_model_names_the_ledger_cannot_store_are_refused(model, words):
    with pytest.raises(InvalidRequest, match=words) as caught:
        estimate_request({"model": model, "messages": [user("Hi")]})
    assert caught.value.param == "model"


def test_the_model_bound_is_the_ledger_column():
    from quotas.models import UsageRecord

    assert UsageRecord._meta.get_field("model").max_length == bounds.MAX_MODEL_LENGTH


def test_message_and_part_counts_are_capped():
    with pytest.raises(InvalidRequest, match="at most 2048 messages"):
        estimate_request(chat(*[{}] * (bounds.MAX_MESSAGES + 1)))
    estimate_request(chat(*[user("")] * bounds.MAX_MESSAGES))
    parts = ["x"] * (bounds.MAX_CONTENT_PARTS // 2 + 1)
    with pytest.raises(InvalidRequest, match="content parts"):
        estimate_request(chat(user(parts), user(parts)))
    with pytest.raises(InvalidRequest, match="at most 2048 items"):
        estimate_request({"input": ["x"] * (bounds.MAX_MESSAGES + 1)})


# -- cost --------------------------------------------------------------------------------------
MEGABYTE = 1_000_000


def _letters(count: int) -> str:
    rng = random.Random(3)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


# Bodies near 1 MB built to be slow to estimate (each case of the issue and more).
WORST_BODIES = {
    "333k-empty-messages": lambda: chat(*[{}] * 333_320),
    "one-run-of-random-letters": lambda: chat(user(_letters(MEGABYTE - 100))),
    "a-megabyte-of-spaces": lambda: chat(user(" " * (MEGABYTE - 100))),
    "a-megabyte-of-punctuation": lambda: chat(user("!?" * (MEGABYTE // 2 - 50))),
    "most-messages": lambda: chat(*[user(f"m{i}") for i in range(bounds.MAX_MESSAGES)]),
    "most-parts": lambda: chat(
        *[user([f"p{i}-{j}" for j in range(5)]) for i in range(bounds.MAX_CONTENT_PARTS // 5)]
    ),
    "wide-tool-schema": lambda: chat(user("Hi"), tools=[{"p": [[i / 7] for i in range(45_000)]}]),
    "many-small-strings": lambda: chat(user("Hi"), tools=[str(i) for i in range(110_000)]),
    "deep-then-wide": lambda: chat(user("Hi"), tools=[*nested(60), *[[]] * 100_000]),
    "prompt-list": lambda: {"prompt": ["x" * 480] * bounds.MAX_MESSAGES},
}


@pytest.mark.parametrize("name", list(WORST_BODIES))
def test_any_body_up_to_a_megabyte_is_estimated_in_well_under_a_second(name):
    body = WORST_BODIES[name]()
    assert len(json.dumps(body, separators=(",", ":"))) <= 1.1 * MEGABYTE
    started = time.process_time()
    with contextlib.suppress(InvalidRequest):
        estimate_request(body)
    # CPU time, not wall time: other processes on the machine do not count against it.
    assert time.process_time() - started < 0.5


def test_the_estimate_is_the_count_of_the_whole_body():
    body = chat(user("Hi"), tools=[{"type": "function", "function": {"name": "f"}}])
    assert estimate_request(body).prompt_tokens == count_prompt_tokens(CL100K, body)
