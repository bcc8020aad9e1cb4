"""Config fields that carry their own help text and bounds, and the one validator that reads them.

    gamma: float = setting(0.7, "eq. 7 compatibility threshold", ge=0, le=1)

``validate(self, "score")`` in ``__post_init__`` checks every bound and raises one ConfigError
naming ``section.key``; ``help_rows`` lists (key, default, help) for ``opdcache init --help`` and
docs/config.md. A field marked ``inline=True`` holds a nested dataclass whose keys appear at its
section's level in YAML (``score.gamma``, not ``score.spec.gamma``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from opdcache.errors import ConfigError


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Any = dataclasses.MISSING,
    inline: bool = False,
) -> Any:
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "bounds": bounds, "inline": inline}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_OPS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def validate(obj: Any, section: str) -> None:
    """Check every field's bounds (and Literal choices); the first violation is one ConfigError."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        if choices and value not in choices:
            raise ConfigError(
                f"{section}.{f.name}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        bounds = f.metadata.get("bounds", {})
        if bounds and not all(_OPS[op][0](value, b) for op, b in bounds.items()):
            want = " and ".join(f"{_OPS[op][1]} {b:g}" for op, b in bounds.items())
            raise ConfigError(f"{section}.{f.name}: expected {want}, got {value!r}")


def fail(section: str, key: str, expected: str, got: Any) -> typing.NoReturn:
    """A cross-field check's error, in the same words as :func:`validate`."""
    raise ConfigError(f"{section}.{key}: expected {expected}, got {got!r}")


def help_rows(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, help) of every leaf setting under ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = prefix if f.metadata.get("inline") else f"{prefix}{f.name}."
            yield from help_rows(tp, sub)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        yield f"{prefix}{f.name}", default, f.metadata.get("help", "")
