"""Checks of run settings (step counts, batch sizes) with one-line messages.

A gin binding reaches the trainer as whatever Python value its text parses to: `'20'`
is a string, `20.5` a float, `-3` a negative count. These checks turn such a value into
one `SettingError` line that names the setting (and the gin macro that usually binds
it) and its valid range, before anything is created or computed.
"""

from __future__ import annotations

import numbers
from typing import Any


class SettingError(ValueError):
    """A run setting is of the wrong type or outside its valid range."""


def whole_number(value: Any, name: str, minimum: int, meaning: str = "") -> int:
    """Returns `value` as an int if it is a whole number >= `minimum`.

    Args:
      value: the bound value.
      name: how the user binds it, e.g. "TRAIN_STEPS".
      minimum: the smallest valid value.
      meaning: what the setting is, shown in parentheses (e.g. "train.total_steps").

    Returns:
      `int(value)`.

    Raises:
      SettingError: `value` is not an integer (a quoted number, a fraction, a bool) or
        is below `minimum`.
    """
    setting = f"{name}={value!r}" + (f" ({meaning})" if meaning else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, str):
            what = "a quoted string; write the number without quotes"
        else:
            what = f"a {type(value).__name__}, not a whole number"
        raise SettingError(f"{setting} is {what} (valid: an integer >= {minimum}).")
    if value < minimum:
        raise SettingError(f"{setting} is out of range (valid: an integer >= {minimum}).")
    return int(value)


def optional_whole_number(value: Any, name: str, minimum: int, meaning: str = "") -> int | None:
    """`whole_number`, with None allowed (and returned)."""
    return None if value is None else whole_number(value, name, minimum, meaning)
