"""Errors a user can cause (bad paths, data or configuration)."""

import math


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message as one line and exits non-zero."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_number(
    key: str,
    value: object,
    low: float,
    high: float | None = None,
    strict: bool = False,
    meaning: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """An `error` (a ValueError, or e.g. a UserError for a CLI setting) naming `key` unless `value` is a finite
    number (not a bool) >= `low` (> with `strict`) and <= `high` when given."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    in_range = number and (value > low if strict else value >= low) and (high is None or value <= high)
    if not in_range:
        bound = f"in [{low:g}, {high:g}]" if high is not None else f"{'>' if strict else '>='} {low:g}"
        note = f" ({meaning})" if meaning else ""
        raise error(f"{key} must be a finite number {bound}{note}, got {value!r}")


def check_int(key: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an integer (not a bool) in [low, high] (each bound when given), else a UserError naming
    `key`: a config value that `int()` would turn into a traceback ("abc") or quietly into nonsense (0, -2)."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bound = f" in [{low}, {high}]"
        else:
            bound = f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")
        raise UserError(f"{key} must be an integer{bound}, got {value!r}")
    return value


def check_bool(key: str, value: object) -> bool:
    """`value` if it is true or false, else a UserError naming `key` (a string such as "maybe" is truthy)."""
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")
    return value
