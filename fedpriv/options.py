"""argparse ``type=`` checkers for numeric options: a bad value fails while parsing, before any work, as one
line (``fedpriv X: error: argument --opt: must be > 0 and finite, got 'nan'``; see :class:`fedpriv.cli.Parser`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _parse(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def check(text: str) -> int:
        value = int(_parse(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value

    check.__name__ = f"integer >= {low}"
    return check


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def check(text: str) -> int:
        value = int(_parse(text, int))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low} and <= {high}, got {text!r}")
        return value

    check.__name__ = f"integer in [{low}, {high}]"
    return check


def number(*, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite float within the bounds (open or closed on each side)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    allowed = " and ".join([*parts, "finite"])

    def check(text: str) -> float:
        value = float(_parse(text, float))
        ok = math.isfinite(value)
        if low is not None:
            ok = ok and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    check.__name__ = f"number ({allowed})"
    return check


POSITIVE = number(low=0.0, low_open=True)
NON_NEGATIVE = number(low=0.0)
OPEN_UNIT = number(low=0.0, high=1.0, low_open=True, high_open=True)
MAX_LENGTH = int_between(8, 512)
