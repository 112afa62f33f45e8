"""A named registry: a dict that refuses silent overrides and names the valid choices on a miss.

Every extensible set of the toolkit (address styles, question types, geo targets, baseline variants,
benchmark system kinds, conversation templates, console commands) is one of these. It *is* a dict, so
`name in reg`, `reg[name]`, `sorted(reg)` and `.items()` work as before; registration order is kept.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has. A KeyError for dict-minded callers, and a project ValueError, so a command
    that passes a user's option through reports it as one line (exit 2), not a traceback."""

    def __str__(self) -> str:  # a KeyError's str() is the repr of its message
        return str(self.args[0]) if self.args else ""


class Registry(dict[str, T], Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = UnknownNameError):
        """`kind` names an entry in messages ("address style"); `error` is what `lookup` raises on a miss."""
        super().__init__()
        self.kind = kind
        self.error = error

    def register(self, name: str, value: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = value
        return value

    # Not an override of `get`: callers of a dict rely on `get` returning None for a missing name.
    def lookup(self, name: str) -> T:
        if name not in self:
            raise self.error(f"unknown {self.kind} {name!r}; valid: {sorted(self)}")
        return self[name]
