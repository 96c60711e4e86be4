"""The one kind of error a user sees as one line, and the checks every layer's options use."""
from __future__ import annotations

import math


class UserError(Exception):
    """Bad input from the person at the keyboard: reported as one line, exit status 2, no traceback."""


# errnos of a disk that takes no more: reported as one line, exit status 1, no traceback
UNWRITABLE = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system",
              13: "permission denied"}


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_range(key: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """Raise UserError unless low <= value <= high (or < for an open end); NaN and inf never pass."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value} is not a finite number")
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise UserError(f"{key}={value} is out of range; allowed: {' and '.join(x for x in (lo, hi) if x)}")
