"""A name -> entry table with the two checks every registry of the rule makes: a taken name
is refused unless replaced on purpose, and an unknown name says what is registered."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``{name: entry}`` of one ``kind`` (``"perception"``, ``"update"``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T, replace: bool = False) -> T:
        """Register ``entry`` as ``name``; ``ValueError`` when another entry has the name and
        ``replace`` is not set (registering the same entry again is a no-op)."""
        if name in self and not replace and self[name] != entry:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.kind} named {name!r} is already registered; choose another name or pass replace=True")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry of ``name``; ``ValueError`` listing the registered names otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self)} (a plug-in adds more: model.plugins)")
        return self[name]
