"""The user's side of one answered rung: its reservation (``Hold``), settled or refunded
exactly once, and the usage figures of the provider's answers."""

from __future__ import annotations

import logging
import threading
from typing import Any

from quotas import services
from quotas.conf import quota_settings
from quotas.core.encodings import count_text_tokens, encoding_for_model
from quotas.streaming import clean_usage

__all__ = ["Hold", "usage_figures"]

logger = logging.getLogger("quotas")


def usage_figures(usage: Any) -> dict[str, int]:
    """The token counts of a ``usage`` block: an SDK object (OpenAI's ``prompt_tokens`` /
    ``completion_tokens``, or ``input_tokens`` / ``output_tokens`` as Anthropic's) or a dict;
    ``{}`` when it has none (the estimate then stands)."""
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        dump = getattr(usage, "model_dump", None)
        usage = dump() if callable(dump) else dict(getattr(usage, "__dict__", {}))
    if "prompt_tokens" not in usage and "input_tokens" in usage:
        usage = {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
        }
    return clean_usage(usage)


class Hold:
    """The user's reservation for one rung: ``reservation`` is a ``Reservation``, or an id
    (a job's, reserved by an earlier run of it). ``tokens`` is its estimate (also what the
    provider's admission counts); ``prompt_tokens`` what the estimate counted of the prompt."""

    def __init__(self, reservation: Any, model: str, tokens: int, prompt_tokens: int) -> None:
        self.reservation = reservation
        self.model = model
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.done = False
        self._lock = threading.Lock()

    def settle(self, usage: dict[str, int]) -> None:
        """Charge the real usage (``{}``: the estimate stands); once."""
        if self._close():
            services.settle(
                self.reservation,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                total_tokens=usage.get("total_tokens"),
            )

    def refund(self) -> None:
        """Give the whole reservation back (the call failed); once."""
        if self._close():
            try:
                services.refund(self.reservation)
            except Exception:  # never hide the call's own error; the TTL sweep charges it
                logger.exception("quotas: could not refund %s", self.reservation)

    def counted(self, text: str) -> dict[str, int]:
        """Usage of a stream that ended without a usage chunk: the prompt as estimated and
        the text produced, counted with the model's encoding."""
        encoding = encoding_for_model(
            self.model,
            fallback=quota_settings.FALLBACK_ENCODING,
            allow_download=quota_settings.ALLOW_ENCODING_DOWNLOAD,
        )
        completion = count_text_tokens(encoding, text)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion}

    def _close(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True
