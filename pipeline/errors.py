"""What the user is told: the exceptions the command line reports without a traceback (a user
mistake; a fit interrupted by a signal after saving its state), the checks of numeric settings
that raise them, and one-line notes.

The CLI turns the exceptions into one line and a non-zero exit; everything else is a bug and keeps
its traceback. A setting's check names the setting (:class:`SettingError`), and where the value
came from a file or an option, :class:`LocatedSettings` lets the error name that place instead
(``params.yaml tasks.sr.fit.lr``, ``--lr``).
"""

from __future__ import annotations

import errno
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in what the user passed in; its message names the offending thing."""


class SettingError(UserError):
    """A setting with a bad value; :attr:`setting` is its name (a field of a settings class)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class LocatedSettings(dict[str, Any]):
    """Flat settings that remember where each one was written (``origins``: name → place), so
    that a :class:`SettingError` about one of them can name the place (:func:`located`)."""

    def __init__(self, values: Mapping[str, Any], origins: Mapping[str, str]) -> None:
        super().__init__(values)
        self.origins = dict(origins)


def located(err: SettingError, values: Mapping[str, Any]) -> UserError:
    """``err`` prefixed by where its setting was written, when ``values`` knows it."""
    origins = getattr(values, "origins", {})
    where = origins.get(err.setting)
    return err if where is None else SettingError(err.setting, f"{where}: {err}")


class FitInterruptedError(Exception):
    """The process was asked to terminate; the fits' state is saved in :attr:`path`
    (:mod:`pipeline.checkpoint`)."""

    def __init__(self, signal_number: int, iteration: int, path: Path) -> None:
        super().__init__(
            f"interrupted at iteration {iteration}; its state is saved in {path}: run the same "
            "command again to resume"
        )
        self.signal_number = signal_number
        self.iteration = iteration
        self.path = path


def write_failure(err: OSError) -> str:
    """Why a write failed, in words: the system's message, and what it means for a full disk."""
    reason = err.strerror or str(err)
    return f"{reason} (the disk is full)" if err.errno == errno.ENOSPC else reason


def note(message: str) -> None:
    """Tell the user, on one line of stderr, that an input was converted or adjusted."""
    print(f"note: {message}", file=sys.stderr)


def _bounds(**bounds: float | None) -> str:
    """`` >= 1 and < 2``: the given bounds as text (keys: minimum, above, maximum, below)."""
    signs = {"minimum": ">=", "above": ">", "maximum": "<=", "below": "<"}
    parts = [f"{signs[key]} {value:g}" for key, value in bounds.items() if value is not None]
    return (" " + " and ".join(parts)) if parts else ""


def check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` when it is an integer (not a bool) within the bounds, else a
    :class:`SettingError` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        bounds = _bounds(minimum=minimum, maximum=maximum)
        raise SettingError(name, f"{name} must be an integer{bounds}, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a float when it is a finite number (not a bool) with ``minimum <= value <=
    maximum``, ``value > above`` and ``value < below`` (each bound optional), else a
    :class:`SettingError` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        bounds = _bounds(minimum=minimum, above=above, maximum=maximum, below=below)
        raise SettingError(name, f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` when it is true or false, else a :class:`SettingError`."""
    if not isinstance(value, bool):
        raise SettingError(name, f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Any) -> str:
    """``value`` when it is one of ``choices`` (strings), else a :class:`SettingError`."""
    if not isinstance(value, str) or value not in choices:
        raise SettingError(name, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
