"""One registry style for things found by name: similarity backends, attribution methods,
mitigations (after opacus' ``register_accountant`` and open_clip's ``list_models``).

A :class:`Registry` maps names to objects. ``@registry.register("name")`` adds one (a decorator;
:meth:`Registry.add` does the same without decorating), :meth:`Registry.get` finds one or raises
:class:`~diffmem.errors.ConfigError` listing the known names, and :meth:`Registry.names` lists
them. Each package keeps its own public functions (``list_backends``, ``get_method``,
``get_mitigation``...) as thin wrappers.

Examples
--------
>>> shapes = Registry("shape")
>>> @shapes.register("square")
... def square(x):
...     return x * x
>>> shapes.get("square")(3), shapes.names()
(9, ['square'])
>>> shapes.get("circle")
Traceback (most recent call last):
...
diffmem.errors.ConfigError: unknown shape 'circle'; known: square
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from diffmem.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects found by name.

    Parameters
    ----------
    kind : str
        What is registered, in words (``"similarity backend"``); it starts the unknown-name
        message ``unknown <kind> 'x'; <known>: a, b, c``.
    known : str, optional
        The word before the list of names in that message (default ``"known"``).
    load : callable, optional
        Called once, before the first look-up, to register the built-in entries (lets a package
        import its modules only when a name is needed).
    """

    def __init__(self, kind: str, *, known: str = "known",
                 load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._known = known
        self._load = load
        self._entries: dict[str, T] = {}

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name`` (replacing one of the same name); returns ``obj``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name {name!r}: use a non-empty string")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated function or class as ``name``."""
        def wrap(obj: T) -> T:
            return self.add(name, obj)
        return wrap

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when it is not registered)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises
        ------
        ConfigError
            For an unknown name; the message lists the known ones.
        """
        self._ensure_loaded()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; {self._known}: "
                              f"{', '.join(self.names())}")
        return self._entries[name]
