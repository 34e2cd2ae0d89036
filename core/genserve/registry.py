"""Named registries that plugins fill through the hooks in ``hookspecs``."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownEntryError(KeyError):
    """Asked for a name that no plugin registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class DuplicateEntryError(ValueError):
    """A name is taken by another object."""


class Registry(Generic[T]):
    """A name -> object map that remembers which plugin registered each entry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def register(self, name: str, obj: T, owner: str = "?", *, replace: bool = False) -> None:
        """Add ``obj`` under ``name`` (case-insensitive), remembering the plugin ``owner``.

        Registering the same object again is harmless; another object under a taken name
        raises ``DuplicateEntryError`` unless ``replace`` is true (a plugin's declared override
        of a built-in: ``genserve.plugins`` decides when that is allowed).
        """
        name = name.lower()
        if name in self._entries and self._entries[name] is obj:
            return
        if name in self._entries and not replace:
            raise DuplicateEntryError(
                f"{self.kind} {name!r} is registered twice: by {self._owners[name]!r} and by {owner!r}"
            )
        self._entries[name] = obj
        self._owners[name] = owner

    def get(self, name: str) -> T:
        try:
            return self._entries[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownEntryError(
                f"unknown {self.kind} {name!r}; installed: {known}"
            ) from None

    def owner(self, name: str) -> str:
        return self._owners[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
        self._owners.clear()
