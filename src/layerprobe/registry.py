"""Name → factory registries with did-you-mean errors (timm's register_model / create_model pattern)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def unknown_name_error(kind: str, name: str, choices: list[str]) -> ValueError:
    """A one-line error naming the bad value, the nearest valid one and the choices."""
    nearest = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    shown = ", ".join(sorted(choices)[:20]) + (", ..." if len(choices) > 20 else "")
    return ValueError(f"unknown {kind} {name!r}.{hint} Choices: {shown}")


class Registry(Generic[T]):
    """Maps a name to a factory; `register` is a decorator, `create` calls the factory by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise unknown_name_error(self.kind, name, list(self._factories))
        return self._factories[name]

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
