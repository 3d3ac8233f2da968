"""Prices per model and the cost of a request, in integer micro-dollars. Framework-free.

A price is in US dollars per million tokens, so ``tokens x price`` is micro-dollars exactly;
a cost is rounded up to the next micro-dollar (never under-charged). The most specific glob
that matches a model gives its price (see ``quotas.core.globs.specificity``). A model no
glob matches is never free: it is charged at the table's highest input and output prices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from quotas.core.globs import glob_matches, specificity

__all__ = ["Price", "PriceTable", "cost_micros"]


@dataclass(frozen=True)
class Price:
    """Input and output prices of the models ``model`` (a glob) matches, $ per 1M tokens."""

    model: str
    input_per_million: Decimal
    output_per_million: Decimal

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-dollars for this many prompt and completion tokens, rounded up."""
        return cost_micros(
            prompt_tokens, completion_tokens, self.input_per_million, self.output_per_million
        )

    def encode(self) -> str:
        """``input:output`` as the Redis reservation record keeps it (exact decimals)."""
        return f"{self.input_per_million}:{self.output_per_million}"

    @classmethod
    def decode(cls, text: str, model: str = "") -> Price:
        given, _, taken = text.partition(":")
        return cls(model, Decimal(given), Decimal(taken))


def cost_micros(prompt: int, completion: int, input_price: Decimal, output_price: Decimal) -> int:
    """``prompt x input_price + completion x output_price`` micro-dollars, rounded up."""
    exact = Decimal(prompt) * input_price + Decimal(completion) * output_price
    return max(math.ceil(exact), 0)


class PriceTable:
    """Prices by model glob; ``price_for(model)`` never answers "free" for an unknown model."""

    def __init__(self, prices: Iterable[Price] = ()) -> None:
        self.prices = sorted(prices, key=lambda p: specificity(p.model), reverse=True)
        self._cache: dict[str, tuple[Price, bool]] = {}

    def __bool__(self) -> bool:
        return bool(self.prices)

    def lookup(self, model: str) -> Price | None:
        """The most specific listed price for ``model``, or ``None``."""
        return next((p for p in self.prices if glob_matches(p.model, model)), None)

    def price_for(self, model: str) -> tuple[Price, bool]:
        """``(price, listed)``: the listed price, or (``listed`` false) the conservative one:
        the highest input and the highest output price in the table."""
        found = self._cache.get(model)
        if found is None:
            price = self.lookup(model)
            found = (price, True) if price else (self.conservative(), False)
            if len(self._cache) < 10_000:  # a bounded memo: model names come from clients
                self._cache[model] = found
        return found

    def conservative(self) -> Price:
        if not self.prices:
            return Price("", Decimal(0), Decimal(0))
        return Price(
            "",
            max(p.input_per_million for p in self.prices),
            max(p.output_per_million for p in self.prices),
        )
