"""How a setting is declared: once, with its type, default, allowed values and help.

Every run-config key (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``-c KEY=VALUE``,
``flwr run --run-config``) is one :class:`Setting`. The core keys are declared in
:mod:`sim.config.keys`; each compressor declares its own in its settings dataclass with
:func:`option` (``sim/compress/codecs/*.py``). Everything else is derived from these
declarations: the typed :class:`sim.config.SplitConfig`, validation, the pyproject table,
the README table and the CLI ``--help`` (``python -m sim docs``; docs/architecture.md).

This module is a leaf: it imports nothing of the project, so both the config and the
compressors can use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


@dataclass(frozen=True)
class Setting:
    """One run-config key.

    ``choices``: the allowed strings (or a function returning them, for lists that come
    from the compressor registry). ``lo``/``hi``: an inclusive numeric range (``lo_open``:
    exclusive at ``lo``). ``check``: any further rule on the value alone, raising
    ``ValueError`` with a reason. Rules that involve several keys live in
    :mod:`sim.config.rules`."""

    key: str
    default: bool | int | float | str
    help: str
    choices: Choices | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    check: Callable[[Any], None] | None = None
    group: str = "core"  # "core", or the compressor that declares it
    allowed_text: str = ""  # the allowed values in words, for the tables (when they are not a fixed list)

    @property
    def attr(self) -> str:
        """The ``SplitConfig`` attribute: the key in snake case."""
        return self.key.replace("-", "_")

    @property
    def type(self) -> type:
        return type(self.default)

    def allowed(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return self.choices() if callable(self.choices) else self.choices

    def coerce(self, raw: Any) -> Any:
        """``raw`` (from TOML, JSON or a ``KEY=VALUE`` string) as this key's type."""
        want, key = self.type, self.key
        if want is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
                return raw.lower() in ("true", "1", "yes")
            raise ConfigError(f"Config key '{key}' must be a boolean (true/false), got {raw!r}.")
        if want is str:
            if isinstance(raw, bool) and "true" in (self.allowed() or ()):  # a TOML boolean for a true/false/... key
                return "true" if raw else "false"
            if not isinstance(raw, str):
                raise ConfigError(f"Config key '{key}' must be a string, got {raw!r}.")
            return raw
        if isinstance(raw, bool):
            raise ConfigError(f"Config key '{key}' must be a number, got {raw!r}.")
        try:
            if want is int:
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                return int(raw) if not isinstance(raw, str) else int(raw, 10)
            return float(raw)
        except (TypeError, ValueError):
            kind = "an integer" if want is int else "a number"
            raise ConfigError(f"Config key '{key}' must be {kind}, got {raw!r}.") from None

    def validate(self, value: Any) -> None:
        """Raise :class:`ConfigError` naming the key if ``value`` is not allowed."""
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise ConfigError(f"Config key '{self.key}' is {value!r}; allowed values: {', '.join(allowed)}.")
        if self.lo is not None or self.hi is not None:
            check_range(self.key, value, -math.inf if self.lo is None else self.lo,
                        math.inf if self.hi is None else self.hi, lo_open=self.lo_open)
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as err:
                raise ConfigError(f"Config key '{self.key}': {err}.") from None

    def describe_allowed(self) -> str:
        """The allowed values in words, for the generated tables."""
        if self.allowed_text:
            return self.allowed_text
        allowed = self.allowed()
        if allowed is not None:
            return ", ".join(f"`{a}`" for a in allowed)
        if self.lo is not None or self.hi is not None:
            left = "(" if self.lo_open else "["
            lo = "-inf" if self.lo is None else _num(self.lo)
            hi = "inf" if self.hi is None else _num(self.hi)
            return f"{left}{lo}, {hi}]"
        return "true, false" if self.type is bool else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)


def check_range(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi or value != value:
        left = "(" if lo_open else "["
        raise ConfigError(f"Config key '{key}' is {value!r}; allowed range: {left}{_num(lo)}, {_num(hi)}].")


# ----------------------------------------------------------------------------- codec settings
def option(default: Any, help: str, *, choices: Choices | None = None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, key: str | None = None) -> Any:
    """A field of a compressor's settings dataclass: its default, help and allowed values.

    The run-config key is ``<codec>-<field>`` (``rdfsq-stats`` for field ``stats`` of
    ``rdfsq``) unless ``key`` names it (a key shared by several codecs, e.g. ``ema-decay``)."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "key": key}
    return dataclasses.field(default=default, metadata={"setting": meta})


def codec_settings(codec: str, settings_type: type) -> tuple[tuple[str, Setting], ...]:
    """``(field name, Setting)`` of every field of a codec's settings dataclass."""
    out = []
    for f in dataclasses.fields(settings_type):
        meta = f.metadata.get("setting")
        if meta is None:
            raise TypeError(f"{settings_type.__qualname__}.{f.name} is not declared with sim.settings.option()")
        key = meta["key"] or f"{codec}-{f.name.replace('_', '-')}"
        out.append((f.name, Setting(key, f.default, meta["help"], choices=meta["choices"], lo=meta["lo"],
                                    hi=meta["hi"], lo_open=meta["lo_open"], group=codec)))
    return tuple(out)


def same_declaration(a: Setting, b: Setting) -> bool:
    """Two declarations of a shared key agree (its users may differ)."""
    return (a.key, a.default, a.help, a.allowed(), a.lo, a.hi, a.lo_open) == (
        b.key, b.default, b.help, b.allowed(), b.lo, b.hi, b.lo_open)
