"""What an image in a chat request costs, by OpenAI's published tile rule. Framework-free.

OpenAI bills an image part by its ``detail`` and size:

- ``"low"``: 85 tokens, whatever the size;
- ``"high"`` (and ``"auto"``, which may choose high): the image is scaled to fit in a
  2048 x 2048 square, then down so its shorter side is 768 px; it costs 85 tokens plus 170 per
  512 px tile of the result.

The size is read from the image itself when the URL is a ``data:`` URL of a PNG, GIF, JPEG or
WebP image (only its header is decoded). For any other URL the size is unknown before the
call, so the estimate is the largest a high-detail image can cost: 8 tiles, 1445 tokens.
Other models bill images by other rules; the settle corrects the estimate to the provider's
figure either way.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct

__all__ = ["DETAILS", "MAX_IMAGE_TOKENS", "image_size", "image_tokens"]

DETAILS = ("auto", "low", "high")
BASE_TOKENS = 85
TILE_TOKENS = 170
TILE_PX = 512
MAX_IMAGE_TOKENS = BASE_TOKENS + TILE_TOKENS * 8  # a 768 x 2048 image: 2 x 4 tiles
# Enough of the data to find a JPEG's frame header behind its metadata in practice.
_JPEG_SCAN_BYTES = 512 * 1024
_JPEG_MAX_SEGMENTS = 512


def image_tokens(detail: str, size: tuple[int, int] | None) -> int:
    """Tokens of one image at this ``detail`` (one of ``DETAILS``) and size (``None``: unknown)."""
    if detail == "low":
        return BASE_TOKENS
    if size is None:
        return MAX_IMAGE_TOKENS
    width, height = (float(max(side, 1)) for side in size)
    scale = min(1.0, 2048 / max(width, height))  # fit in a 2048 x 2048 square
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))  # then the shorter side down to 768
    width, height = width * scale, height * scale
    tiles = math.ceil(width / TILE_PX) * math.ceil(height / TILE_PX)
    return BASE_TOKENS + TILE_TOKENS * tiles


def image_size(url: str) -> tuple[int, int] | None:
    """``(width, height)`` of a base64 ``data:`` URL's image, ``None`` when unknown."""
    if not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        return None
    head = _decode(data[: 4 * (_JPEG_SCAN_BYTES // 3)])
    if head is None:
        return None
    return _png(head) or _gif(head) or _webp(head) or _jpeg(head)


def _decode(data: str) -> bytes | None:
    try:
        return base64.b64decode(data[: len(data) - len(data) % 4], validate=False)
    except (binascii.Error, ValueError):
        return None


def _png(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


def _gif(data: bytes) -> tuple[int, int] | None:
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """The frame header's size: walk the segments (a bounded number of them)."""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if position + 9 > len(data) or data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        position += 2 + length
    return None
