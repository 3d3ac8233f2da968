"""Model-name globs: ``gpt-4o*`` matches ``gpt-4o`` and ``gpt-4o-mini``. Framework-free.

Only two wildcards exist: ``*`` (any run of characters, empty included) and ``?`` (one
character). Matching is case-sensitive, as providers' model names are. A blank glob matches
every model. Character classes (``[...]``) are refused: with them the overlap of two globs
(which price applies?) could not be decided simply.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import cache

__all__ = ["glob_error", "glob_matches", "globs_overlap", "specificity"]

WILDCARDS = frozenset("*?")
MAX_GLOB_LENGTH = 200


def glob_error(glob: str) -> str | None:
    """Why ``glob`` is not a usable model glob, or ``None`` when it is."""
    if len(glob) > MAX_GLOB_LENGTH:
        return f"A model glob is at most {MAX_GLOB_LENGTH} characters."
    if any(ch in "[]" for ch in glob):
        return "Only the wildcards * and ? are allowed in a model glob (no [...] classes)."
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in glob):
        return "A model glob cannot contain control characters."
    return None


def glob_matches(glob: str, model: str) -> bool:
    """Whether ``model`` matches ``glob`` (a blank glob matches every model)."""
    if not glob:
        return True
    return _matches(glob, model)


@cache
def _matches(glob: str, model: str) -> bool:
    # Cached: a process sees few distinct (glob, model) pairs, and fnmatch compiles a regex.
    return fnmatchcase(model, glob)


def specificity(glob: str) -> tuple[int, int]:
    """A sort key: higher is more specific. An exact name beats any glob; among globs, more
    literal characters win (``gpt-4o-mini*`` beats ``gpt-4o*``); a blank glob is least."""
    if not glob:
        return 0, -1
    literals = sum(1 for ch in glob if ch not in WILDCARDS)
    exact = 1 if not any(ch in WILDCARDS for ch in glob) else 0
    return exact, literals


def globs_overlap(a: str, b: str) -> bool:
    """Whether some model name matches both globs (a blank glob overlaps everything)."""
    if not a or not b:
        return True
    return _intersect(a, b, 0, 0)


@cache
def _intersect(a: str, b: str, i: int, j: int) -> bool:
    """Whether the suffixes ``a[i:]`` and ``b[j:]`` match a common string.

    A walk over both patterns at once: a ``*`` may match nothing (advance past it) or take a
    character the other pattern produces (stay on it while the other advances). Memoised,
    so it is O(len(a) * len(b)).
    """
    if i == len(a) and j == len(b):
        return True
    if i < len(a) and a[i] == "*" and _intersect(a, b, i + 1, j):
        return True
    if j < len(b) and b[j] == "*" and _intersect(a, b, i, j + 1):
        return True
    if i == len(a) or j == len(b):
        return False
    x, y = a[i], b[j]
    if not (x in WILDCARDS or y in WILDCARDS or x == y):
        return False
    next_i = i if x == "*" else i + 1
    next_j = j if y == "*" else j + 1
    if (next_i, next_j) == (i, j):  # two stars side by side: covered by the moves above
        return False
    return _intersect(a, b, next_i, next_j)
