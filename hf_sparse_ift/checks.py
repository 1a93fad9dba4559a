"""The small value checks every config of the package uses; each failure names the key, the bad value
and what would be valid (the model config keeps its own copy: its folder must stay self-contained)."""

from __future__ import annotations

import math

from .errors import UsageError


def invalid(key: str, value, allowed: str):
    raise UsageError(f"{key}={value!r} is invalid: {allowed}")


def integer(key: str, value, low: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        invalid(key, value, f"expected an integer >= {low}" + (" or null" if allow_none else ""))


def number(
    key: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        invalid(key, value, "expected a number")
    if low is not None and (value < low or (low_open and value == low)):
        invalid(
            key,
            value,
            f"expected a number {'>' if low_open else '>='} {low}"
            + (f" and {'<' if high_open else '<='} {high}" if high is not None else ""),
        )
    if high is not None and (value > high or (high_open and value == high)):
        invalid(
            key,
            value,
            f"expected a number {'<' if high_open else '<='} {high}"
            + (f" and {'>' if low_open else '>='} {low}" if low is not None else ""),
        )


def choice(key: str, value, choices) -> None:
    if value not in choices:
        invalid(key, value, f"expected one of {list(choices)}")


def text(key: str, value) -> None:
    if not isinstance(value, str) or not value:
        invalid(key, value, "expected a non-empty string")
